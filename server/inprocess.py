"""An in-process stand-in for Flower's ``Grid``: ClientApps called directly, no SuperLink, no Ray.

For tests and debugging of the ServerApp loop. Messages go through the real ``ClientApp`` object
(its handler routing included) with one persistent ``Context`` per node, so ``context.state``
behaves as on a SuperNode. An exception in a handler becomes an error reply, as in Flower.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    """A ``Grid`` with ``get_node_ids`` and ``send_and_receive``, backed by direct calls.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app to call.
    num_nodes : int
        Nodes, with ``node_config = {"partition-id": i, "num-partitions": num_nodes}`` like simulation.
    run_config : mapping
        ``context.run_config`` of every node.
    seed : int
        Node ids are random like Flower's (but reproducible here).
    fail : callable, optional
        ``fail(partition_id, message) -> bool``: make that node's handler raise (failure tests).
    node_configs : sequence of mapping, optional
        Node ``i``'s node config instead of the simulation's (a deployed site's, e.g.
        ``{"site": "/data/site-0"}``); ``partition_of`` still returns ``i``.
    """

    def __init__(self, client_app, num_nodes: int, run_config: Mapping | None = None, seed: int = 0,
                 fail: Callable[[int, Message], bool] | None = None,
                 node_configs: Sequence[Mapping] | None = None) -> None:
        rng = random.Random(seed)
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.app = client_app
        self.fail = fail
        self.contexts: dict[int, Context] = {}
        self.partitions: dict[int, int] = {}
        for pid in range(num_nodes):
            nid = rng.randrange(1, 2**62)
            config = dict(node_configs[pid]) if node_configs is not None else {"partition-id": pid, "num-partitions": num_nodes}
            self.contexts[nid] = Context(run_id=1, node_id=nid, node_config=config, state=RecordDict(),
                                         run_config=dict(run_config or {}))
            self.partitions[nid] = pid
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def partition_of(self, node_id: int) -> int:
        return self.partitions[node_id]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            # A ClientApp sets its process's thread count (client-threads); here that process is the
            # server's, so its count is put back, as if the client had run elsewhere.
            threads = torch.get_num_threads()
            try:
                if self.fail is not None and self.fail(self.partition_of(msg.metadata.dst_node_id), msg):
                    raise RuntimeError("injected client failure")
                reply = self.app(msg, context)
            except Exception as exc:  # noqa: BLE001  (Flower turns handler exceptions into error replies too)
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            finally:
                torch.set_num_threads(threads)
            replies.append(reply)
        return replies
