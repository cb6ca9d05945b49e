"""The plug-in point for aggregation strategies: what travels, what stays local, how replies merge.

A :class:`FederatedStrategy` has a server half and a client half, so one object describes a whole
aggregation scheme, and the training code (``server.runner``, ``client.task``) never branches on a
strategy's name:

* server: which keys the server broadcasts (:meth:`broadcast_keys`), how the replies of a round
  are aggregated (:meth:`aggregate`, delegated to a ``flwr.serverapp.strategy`` class, replies
  sorted by partition id first so float sums do not depend on arrival order), and how the
  aggregate is merged into the server's model (:meth:`merge`);
* client: which keys never leave the client (:meth:`local_keys`, kept in ``context.state``), how a
  broadcast is loaded on top of them (:meth:`client_load`), which keys a client uploads
  (:meth:`upload_keys`), what it keeps after training (:meth:`client_keep`) and an optional extra
  local loss (:meth:`client_regulariser`).

FedAvg uses the defaults. FedBN overrides :meth:`local_keys` (BatchNorm tensors); FRAug would add
a local module in ``context.state`` and a :meth:`client_regulariser`. A user's own strategy is a
subclass named by its dotted path (see :func:`strategies.get_strategy`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from detection.model import get_state, select_keys, set_state
from strategies import protocol

# Key of the ArrayRecord in ``context.state`` holding a client's local tensors.
LOCAL_STATE_KEY = "strategy.local-arrays"


def sort_replies_by_partition(replies: Iterable[Message], key: str = protocol.PARTITION_ID) -> list[Message]:
    """Replies ordered by the partition id in their (single) MetricRecord.

    Floating-point sums depend on the order of the terms; Flower returns replies in arrival order,
    which differs between runs with parallel clients. Sorting makes aggregation reproducible.
    """
    def pid(msg: Message) -> int:
        metrics = next(iter(msg.content.metric_records.values()), None)
        if metrics is None or key not in metrics:
            raise KeyError(f"reply from node {msg.metadata.src_node_id} has no '{key}' metric")
        return int(metrics[key])

    return sorted(replies, key=pid)


def aggregation_view(reply: Message, weight_key: str = protocol.NUM_EXAMPLES) -> Message:
    """The reply reduced to what aggregation needs: its ArrayRecord and a MetricRecord of the weight.

    Flower's strategies require every reply's MetricRecord to have identical keys; diagnostics
    (pseudo-label counts, personal mAP, losses) are free-form and stay out of aggregation.
    """
    content = reply.content
    if len(content.array_records) != 1:
        raise ValueError(f"reply from node {reply.metadata.src_node_id} holds {len(content.array_records)} ArrayRecords, expected 1")
    (array_key, arrays), = content.array_records.items()
    metrics = next(iter(content.metric_records.values()), None)
    if metrics is None or weight_key not in metrics:
        raise KeyError(f"reply from node {reply.metadata.src_node_id} has no '{weight_key}' metric")
    slim = RecordDict({array_key: arrays, protocol.METRICS: MetricRecord({weight_key: metrics[weight_key],
                                                                           protocol.PARTITION_ID: metrics.get(protocol.PARTITION_ID, -1)})})
    return Message(content=slim, metadata=copy.copy(reply.metadata))


def merge_states(global_state: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's state with the keys present in ``update`` replaced, each kept in its own dtype.

    Keys absent from ``update`` (phase 1: neck and head) stay the server's. Averaging turns int64
    counters into floats; they are cast back (rounded) to the global tensor's dtype.
    """
    unknown = [k for k in update if k not in global_state]
    if unknown:
        raise KeyError(f"aggregate holds {len(unknown)} keys the model does not have, e.g. {unknown[:3]}")
    merged = dict(global_state)
    for k, v in update.items():
        target = global_state[k]
        v = torch.as_tensor(v)
        if v.shape != target.shape:
            raise KeyError(f"{k}: aggregate shape {tuple(v.shape)} != model shape {tuple(target.shape)}")
        if not target.dtype.is_floating_point and v.dtype.is_floating_point:
            v = v.round()
        merged[k] = v.to(target.dtype)
    return merged


class FederatedStrategy:
    """Base class: FedAvg behaviour on both sides, built on a Flower strategy for aggregation.

    Parameters
    ----------
    flower_strategy : flwr.serverapp.strategy.Strategy
        Its ``aggregate_train`` averages the replies of a round (weighted by ``num-examples`` for
        FedAvg). Its sampling and ``start`` loop are not used: the ServerApp samples partitions
        deterministically and owns the round loop (a server epoch runs between rounds).
    """

    name = "base"

    def __init__(self, flower_strategy: Strategy, weight_key: str = protocol.NUM_EXAMPLES) -> None:
        self.flower = flower_strategy
        self.weight_key = weight_key

    # -- server side ---------------------------------------------------------------------------

    def broadcast_keys(self, model: torch.nn.Module) -> list[str]:
        """Keys the server sends each round: the full state, so a never-sampled client can start."""
        return list(model.state_dict().keys())

    def aggregate(self, server_round: int, replies: Sequence[Message]) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        """Aggregate successful train replies into a partial state dict (the uploaded keys).

        Parameters
        ----------
        server_round : int
            Global round number (1-based), passed on to the Flower strategy.
        replies : sequence of Message
            Replies without error, each with one ArrayRecord and one MetricRecord.

        Returns
        -------
        (dict or None, MetricRecord or None)
            Aggregated tensors by key and the Flower strategy's aggregated metrics.
        """
        ordered = [aggregation_view(m, self.weight_key) for m in sort_replies_by_partition(replies)]
        arrays, metrics = self.flower.aggregate_train(server_round, ordered)
        if arrays is None:
            return None, metrics
        return {k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}, metrics

    def merge(self, global_state: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The server's new state from its current one and the aggregate (default: overwrite)."""
        return merge_states(global_state, aggregate)

    # -- client side ---------------------------------------------------------------------------

    def local_keys(self, model: torch.nn.Module) -> list[str]:
        """Keys that never leave a client (none for FedAvg; BatchNorm for FedBN)."""
        return []

    def upload_keys(self, model: torch.nn.Module, groups: Iterable[str]) -> list[str]:
        """Keys a client uploads: the round's groups minus this strategy's local keys."""
        local = set(self.local_keys(model))
        return [k for k in select_keys(model, groups) if k not in local]

    def client_load(self, model: torch.nn.Module, broadcast: Mapping[str, torch.Tensor], state: RecordDict) -> None:
        """Load a broadcast into the model, then the client's own local tensors on top.

        Every tensor of the model must come from one of the two (a freshly built model's random
        weights must never train by accident); ``strict=False`` only because each covers a part.
        """
        local = state.array_records[LOCAL_STATE_KEY].to_torch_state_dict() if LOCAL_STATE_KEY in state.array_records else {}
        missing = [k for k in model.state_dict() if k not in broadcast and k not in local]
        if missing:
            raise KeyError(f"{len(missing)} model tensors neither broadcast nor kept locally, e.g. {missing[:3]}")
        set_state(model, broadcast, strict=False)
        if local:
            set_state(model, local, strict=False)

    def client_keep(self, model: torch.nn.Module, state: RecordDict) -> None:
        """After training: persist the local keys in ``context.state`` (nothing for FedAvg)."""
        keys = self.local_keys(model)
        if keys:
            state[LOCAL_STATE_KEY] = ArrayRecord(get_state(model, keys))

    def client_regulariser(self, model: torch.nn.Module, state: RecordDict) -> Callable[[], torch.Tensor] | None:
        """An extra local loss term (None for FedAvg)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flower={type(self.flower).__name__})"
