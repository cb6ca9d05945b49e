"""Replies are collected as they arrive (push, then pull), not on Flower's 3-second deployment poll."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.exchange import send_and_receive


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class SlowGrid:
    """Push and pull like Flower's grids; node ``n``'s reply is there from pull number ``ready[n]`` on."""

    def __init__(self, ready: dict[int, int]) -> None:
        self.ready = ready
        self.pulls = 0
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # what Flower's grids do on a push
            self.sent[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [Message(RecordDict({"config": ConfigRecord({"node": m.metadata.dst_node_id})}), reply_to=m)
                for mid in message_ids if self.pulls >= self.ready[(m := self.sent[mid]).metadata.dst_node_id]]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - must not be used
        raise AssertionError("the 3-second poll was used")


def messages(nodes):
    return [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train") for n in nodes]


def test_every_reply_is_collected_one_pull_after_the_last_one_arrives():
    grid = SlowGrid({7: 1, 8: 4, 9: 2})
    replies = send_and_receive(grid, messages([7, 8, 9]), timeout=60, first_wait=0.0, max_wait=0.0)
    assert sorted(r.content["config"]["node"] for r in replies) == [7, 8, 9]
    assert grid.pulls == 4  # stopped at the pull that brought the last reply
    assert len({r.metadata.reply_to_message_id for r in replies}) == 3  # each reply once


def test_a_timeout_returns_the_replies_that_came():
    grid = SlowGrid({7: 1, 8: 10**9})
    replies = send_and_receive(grid, messages([7, 8]), timeout=0.3, first_wait=0.01, max_wait=0.05)
    assert [r.content["config"]["node"] for r in replies] == [7]


def test_a_grid_without_push_and_pull_keeps_its_own_send_and_receive():
    class Plain:
        def send_and_receive(self, msgs, *, timeout=None):
            return [Message(RecordDict(), reply_to=m) for m in msgs]

    msgs = messages([3])
    msgs[0].metadata.__dict__["_message_id"] = "only"
    assert [r.metadata.reply_to_message_id for r in send_and_receive(Plain(), msgs, timeout=1)] == ["only"]
