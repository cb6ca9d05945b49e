"""Reply classification, minimum reply fraction, round summaries."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.guard import expected_specs
from server.rounds import classify_replies, mean_losses, personal_summary, pseudo_summary, required_replies


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def request(nid):
    return Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=nid, message_type="train")


def ok_reply(nid, pid, keys=("a", "b")):
    return Message(RecordDict({"arrays": ArrayRecord({k: torch.zeros(1) for k in keys}),
                               "metrics": MetricRecord({"num-examples": 4, "partition-id": pid})}), reply_to=request(nid))


def test_classify_counts_every_kind_of_failure():
    sent = {11: 0, 12: 1, 13: 2, 14: 3, 15: 4}
    replies = [ok_reply(11, 0), Message(Error(code=1, reason="actor died"), reply_to=request(12)),
               ok_reply(13, 7), ok_reply(14, 3, keys=("a",)), ok_reply(99, 9)]
    out = classify_replies(replies, sent, expected_specs({"a": torch.zeros(1), "b": torch.zeros(1)}))
    assert [int(r.content["metrics"]["partition-id"]) for r in out.ok] == [0]
    text = "\n".join(out.failures)
    assert out.num_failures == 5
    for needle in ("actor died", "claims partition 7", "uploaded 1 tensors", "did not send", "partition 4 (node 15): no reply"):
        assert needle in text


def test_the_guard_rejects_nan_shape_weight_and_duplicate_and_keeps_the_rest():
    sent = {11: 0, 12: 1, 13: 2, 14: 3, 15: 4}
    nan = ok_reply(12, 1)
    nan.content["arrays"] = ArrayRecord({"a": torch.full((1,), float("nan")), "b": torch.zeros(1)})
    shape = ok_reply(13, 2)
    shape.content["arrays"] = ArrayRecord({"a": torch.zeros(2), "b": torch.zeros(1)})
    negative = ok_reply(14, 3)
    negative.content["metrics"] = MetricRecord({"num-examples": -4, "partition-id": 3})
    replies = [ok_reply(11, 0), nan, shape, negative, ok_reply(15, 4), ok_reply(15, 4)]
    out = classify_replies(replies, sent, expected_specs({"a": torch.zeros(1), "b": torch.zeros(1)}))
    assert [int(r.content["metrics"]["partition-id"]) for r in out.ok] == [0, 4]
    reasons = {r["partition"]: r["reason"] for r in out.rejected}
    assert set(reasons) == {1, 2, 3, 4}
    assert "NaN/Inf" in reasons[1] and "shape (2,)" in reasons[2] and "num-examples" in reasons[3] and "second reply" in reasons[4]


def test_required_replies():
    assert required_replies(10, 1.0) == 10
    assert required_replies(10, 0.75) == 8
    assert required_replies(3, 0.01) == 1
    assert required_replies(4, 0.5) == 2


def test_summaries():
    clients = {"0": {"num-examples": 10, "pseudo_images": 8, "images_skipped": 2, "pseudo_reliable": 30, "pseudo_uncertain": 10,
                     "pseudo_reliable_precision": 0.9, "loss_cls": 1.0, "personal_map50": 0.4, "personal_map50_95": 0.2},
               "1": {"num-examples": 30, "pseudo_images": 10, "images_skipped": 0, "pseudo_reliable": 10, "pseudo_uncertain": 0,
                     "pseudo_reliable_precision": 0.5, "loss_cls": 2.0, "personal_map50": 0.6, "personal_map50_95": 0.4}}
    p = pseudo_summary(clients)
    assert p["reliable_per_image"] == pytest.approx(40 / 20)
    assert p["uncertain_per_image"] == pytest.approx(10 / 20)
    assert p["reliable_precision"] == pytest.approx(0.7)
    assert mean_losses(clients)["loss_cls"] == pytest.approx((10 * 1 + 30 * 2) / 40)
    per = personal_summary(clients, {"0": "rainy", "1": "night"})
    assert per["rainy"]["map50"] == 0.4 and per["Total"]["map50"] == pytest.approx(0.5)


def test_the_superlinks_answer_for_a_node_without_heartbeat_is_counted_for_that_node():
    from flwr.common.constant import SUPERLINK_NODE_ID

    sent = {11: 0, 12: 1}
    asked = [request(11), request(12)]
    for k, msg in enumerate(asked):
        msg.metadata.__dict__["_message_id"] = f"message-{k}"  # what pushing a message sets
    gone = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=asked[1])
    gone.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # the SuperLink answers, not node 12
    nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in asked}
    out = classify_replies([ok_reply(11, 0), gone], sent, message_nodes=nodes)
    assert out.failures == ["partition 1 (node 12): Error: Node Unavailable"]
    without = classify_replies([ok_reply(11, 0), gone], sent)  # what was reported before: two wrong lines
    assert any("node 1: reply to a message this round did not send" in f for f in without.failures)
