"""The plug-in point for aggregation strategies: what travels, what stays local, how replies merge.

A :class:`FederatedStrategy` has a server half and a client half, so one object describes a whole
aggregation scheme, and the training code (``server.runner``, ``client.app``) never branches on a
strategy's name. Both halves are built from the same two run-config strings, ``strategy`` and
``strategy-options`` (see :func:`parse_options`), which travel to clients in the round
instructions. The hooks, in the order a round calls them:

server, before the round
    :meth:`~FederatedStrategy.upload_keys` (what clients will upload), then
    :meth:`~FederatedStrategy.configure_round` (the global state after the server epoch and the
    round's upload keys: FedOpt's current arrays), then
    :meth:`~FederatedStrategy.server_arrays` (extra arrays beside the model, e.g. FRAug's
    generator) and :meth:`~FederatedStrategy.broadcast_keys` (what the model broadcast holds).
client
    :meth:`~FederatedStrategy.client_load` (the broadcast, then the node's own saved state on
    top), :meth:`~FederatedStrategy.client_loss` (a :class:`LossHook` that sees the batch, the
    model outputs and the features at the detection head), :meth:`~FederatedStrategy.client_state`
    (what the node saves on its own disk; never sent), :meth:`~FederatedStrategy.upload_keys` and
    :meth:`~FederatedStrategy.client_arrays` (what it uploads).
server, after the round
    the reply guard (``strategies.guard``, run by ``server.rounds``) rejects malformed replies;
    :meth:`~FederatedStrategy.aggregate` (delegated to a ``flwr.serverapp.strategy`` class, replies
    sorted by partition id first so float sums do not depend on arrival order),
    :meth:`~FederatedStrategy.merge` (the aggregate into the server's model) and
    :meth:`~FederatedStrategy.load_server_arrays` (the aggregated extra arrays).
checkpoint
    :meth:`~FederatedStrategy.state_dict` / :meth:`~FederatedStrategy.load_state_dict` (server
    optimiser moments, FRAug's generator), saved with every server checkpoint.

A user's own strategy is a subclass, selected by dotted path or as an installed plug-in in the
entry-point group ``fedsto.strategies`` (see :mod:`strategies`; ``docs/strategies.md``).
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from detection.loss_hooks import LossHook
from detection.model import select_keys, set_state
from strategies import protocol

# Prefix of the extra arrays (outside the detector's state_dict) inside the one ArrayRecord of a message.
EXTRA_PREFIX = "strategy/"

# Flower strategies are used for their arithmetic only: the ServerApp samples partitions itself, so
# they must never sample or wait for nodes (``configure_train`` with these settings returns at once).
NO_SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 0, "min_evaluate_nodes": 0,
               "min_available_nodes": 0}


class NoNodes:
    """A Grid stand-in with no nodes, for Flower's ``configure_train`` (it samples nothing from it)."""

    def get_node_ids(self) -> list[int]:
        return []


class StrategyError(ValueError):
    """An unknown or unusable strategy, a bad strategy option, or a round too small for it."""


@dataclass(frozen=True)
class StrategyOption:
    """One option of a strategy, given as ``name=value`` in the ``strategy-options`` run-config string.

    Parameters
    ----------
    name : str
        Kebab-case name (``proximal-mu``); the constructor receives it in snake case.
    type : type
        ``int``, ``float``, ``str`` or ``bool``.
    default : object
        Value when the option is not given.
    doc : str
        One line for ``fedsto strategies``.
    """

    name: str
    type: type
    default: Any
    doc: str

    @property
    def argument(self) -> str:
        return self.name.replace("-", "_")


def _coerce_option(strategy: str, option: StrategyOption, text: str) -> Any:
    try:
        if option.type is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return option.type(text)
    except ValueError:
        raise StrategyError(f"strategy {strategy!r} option {option.name}={text!r}: expected {option.type.__name__}") from None


def parse_options(text: str, options: Sequence[StrategyOption], strategy: str = "strategy") -> dict[str, Any]:
    """Keyword arguments from a ``strategy-options`` string such as ``"proximal-mu=0.01 eta=0.01"``.

    Parameters
    ----------
    text : str
        ``name=value`` pairs separated by spaces or commas (shell quoting for values with spaces).
    options : sequence of StrategyOption
        What the strategy accepts.
    strategy : str
        Its name, for error messages.

    Returns
    -------
    dict
        Snake-case argument -> typed value, for every option (defaults filled in).

    Raises
    ------
    StrategyError
        Naming the unknown option (and the known ones) or the value of the wrong type.
    """
    known = {o.name: o for o in options}
    values = {o.argument: o.default for o in options}
    try:
        tokens = shlex.split(text.replace(",", " "))
    except ValueError as err:
        raise StrategyError(f"strategy {strategy!r} options {text!r}: {err}") from None
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep or not name:
            raise StrategyError(f"strategy {strategy!r} options {text!r}: expected name=value pairs, got {token!r}")
        if name not in known:
            accepted = ", ".join(known) or "none"
            raise StrategyError(f"strategy {strategy!r} has no option {name!r}; it accepts: {accepted}")
        values[known[name].argument] = _coerce_option(strategy, known[name], value)
    return values


@dataclass(frozen=True)
class RoundContext:
    """What the server hook :meth:`FederatedStrategy.configure_round` sees before a round.

    Parameters
    ----------
    server_round : int
        Global round number (1-based).
    global_state : mapping of str to Tensor
        The server model's state, after its last server epoch (what is broadcast).
    upload_keys : sequence of str
        Model keys the clients upload this round (phase 1: the backbone only).
    parameter_keys : frozenset of str
        The model's float parameters (not buffers): adaptive server steps apply to these only.
    num_sampled : int
        Clients sampled this round.
    """

    server_round: int
    global_state: Mapping[str, torch.Tensor]
    upload_keys: Sequence[str]
    parameter_keys: frozenset[str]
    num_sampled: int


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


def aggregation_view(reply: Message, weight_key: str = protocol.NUM_EXAMPLES, keys: Iterable[str] | None = None) -> Message:
    """The reply reduced to what aggregation needs: its ArrayRecord (or some of its keys) and the weight.

    Flower's strategies require every reply's MetricRecord to have identical keys; diagnostics
    (pseudo-label counts, personal mAP, losses) are free-form and stay out of aggregation.
    """
    content = reply.content
    if len(content.array_records) != 1:
        raise ValueError(f"reply from node {reply.metadata.src_node_id} holds {len(content.array_records)} ArrayRecords, expected 1")
    (array_key, arrays), = content.array_records.items()
    # A new record of the same Array objects (some Flower rules read with keep_input=False, which
    # empties it), filled item by item: ArrayRecord(dict) would re-serialise every array.
    view = ArrayRecord()
    for k in (arrays.keys() if keys is None else keys):
        view[k] = arrays[k]
    arrays = view
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


def split_extra(arrays: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model tensors, extra arrays without their prefix) of one ArrayRecord's contents."""
    model, extra = {}, {}
    for k, v in arrays.items():
        if k.startswith(EXTRA_PREFIX):
            extra[k[len(EXTRA_PREFIX):]] = v
        else:
            model[k] = v
    return model, extra


def with_extra(model_state: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One dict for one ArrayRecord: the model tensors and the prefixed extra arrays."""
    return {**model_state, **{EXTRA_PREFIX + k: v for k, v in extra.items()}}


class FederatedStrategy:
    """Base class: FedAvg behaviour on both sides, built on a Flower strategy for aggregation.

    Parameters
    ----------
    flower_strategy : flwr.serverapp.strategy.Strategy
        Its ``aggregate_train`` aggregates the replies of a round. Its sampling and ``start`` loop
        are not used: the ServerApp samples partitions deterministically and owns the round loop
        (a server epoch runs between rounds), so it must be built with ``min_*`` = 0.
    weight_key : str
        The reply metric used as the aggregation weight.

    Attributes
    ----------
    name : str
        The registry name.
    description : str
        One line for ``fedsto strategies``.
    options : tuple of StrategyOption
        What ``strategy-options`` may set; :meth:`from_options` passes them to ``__init__``.
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    options: ClassVar[tuple[StrategyOption, ...]] = ()

    def __init__(self, flower_strategy: Strategy, weight_key: str = protocol.NUM_EXAMPLES) -> None:
        self.flower = flower_strategy
        self.weight_key = weight_key

    @classmethod
    def from_options(cls, text: str = "") -> "FederatedStrategy":
        """An instance from a ``strategy-options`` string (see :func:`parse_options`)."""
        values = parse_options(text, cls.options, cls.name)
        try:
            return cls(**values)
        except TypeError as err:
            raise StrategyError(f"strategy {cls.name!r} ({cls.__module__}.{cls.__qualname__}) cannot be built from its "
                                f"options {values}: {err}") from None

    # -- server side ---------------------------------------------------------------------------

    def min_replies(self) -> int:
        """Fewest replies the aggregation rule needs (robust aggregators need more than one)."""
        return 1

    def check_round_size(self, num_sampled: int, num_required: int) -> None:
        """Refuse, before round 1, a round that could end with too few replies for this rule.

        Parameters
        ----------
        num_sampled : int
            Clients sampled per round.
        num_required : int
            Replies the run insists on per round (``min-reply-fraction`` of the sampled ones).
        """
        need = self.min_replies()
        if num_required < need:
            raise StrategyError(f"strategy {self.name} needs {need} replies per round ({self.min_replies_rule()}), "
                                f"but a round samples {num_sampled} clients and may go on with {num_required}: "
                                "sample more clients (fraction-train, num-supernodes) or raise min-reply-fraction")

    def min_replies_rule(self) -> str:
        return "at least one"

    def setup(self, model: torch.nn.Module) -> None:
        """Called once the server's model is built (before a checkpoint is restored): size extra state."""

    def broadcast_keys(self, model: torch.nn.Module) -> list[str]:
        """Keys the server sends each round: the full state, so a never-sampled client can start."""
        return list(model.state_dict().keys())

    def server_arrays(self) -> dict[str, torch.Tensor]:
        """Extra arrays sent beside the model (none by default; FRAug: its shared generator).

        Clients upload arrays of the same keys, shapes and dtypes (:meth:`client_arrays`); the guard
        checks them, :meth:`aggregate` aggregates them with the model keys, and
        :meth:`load_server_arrays` takes the result.
        """
        return {}

    def configure_round(self, context: RoundContext) -> None:
        """Called before each client round (nothing by default; FedOpt keeps the current arrays)."""

    def aggregate(self, server_round: int, replies: Sequence[Message]) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        """Aggregate guarded train replies into a partial state dict (the uploaded keys, extras prefixed).

        Parameters
        ----------
        server_round : int
            Global round number (1-based), passed on to the Flower strategy.
        replies : sequence of Message
            Replies that passed the guard, each with one ArrayRecord and one MetricRecord.

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
        """The server's new state from its current one and the aggregated model keys (default: overwrite)."""
        return merge_states(global_state, aggregate)

    def load_server_arrays(self, aggregate: Mapping[str, torch.Tensor]) -> None:
        """Take the aggregated extra arrays (prefix removed); nothing by default."""

    def server_loss(self, model: torch.nn.Module) -> LossHook | None:
        """An extra term of the server's supervised epochs (None by default; FRAug on ground truth)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The server half's state (moments, generator...), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""

    # -- client side ---------------------------------------------------------------------------

    def local_keys(self, model: torch.nn.Module) -> list[str]:
        """Model keys that never leave a client (none for FedAvg; BatchNorm for FedBN)."""
        return []

    def upload_keys(self, model: torch.nn.Module, groups: Iterable[str]) -> list[str]:
        """Model keys a client uploads: the round's groups minus this strategy's local keys."""
        local = set(self.local_keys(model))
        return [k for k in select_keys(model, groups) if k not in local]

    def client_load(self, model: torch.nn.Module, broadcast: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor],
                    local: Mapping[str, Any]) -> None:
        """Load a broadcast into the model, then the node's own saved state on top.

        Parameters
        ----------
        model : torch.nn.Module
            A freshly built model.
        broadcast : mapping
            The model tensors the server sent.
        extra : mapping
            The extra arrays the server sent (:meth:`server_arrays`, prefix removed).
        local : mapping
            What :meth:`client_state` returned the last time this node trained in this run
            (empty for a client sampled for the first time: it starts from the broadcast).

        Every tensor of the model must come from one of the two (a freshly built model's random
        weights must never train by accident); ``strict=False`` only because each covers a part.
        """
        own = local.get("model", {})
        missing = [k for k in model.state_dict() if k not in broadcast and k not in own]
        if missing:
            raise KeyError(f"{len(missing)} model tensors neither broadcast nor kept locally, e.g. {missing[:3]}")
        set_state(model, broadcast, strict=False)
        if own:
            set_state(model, own, strict=False)

    def client_loss(self, model: torch.nn.Module, instructions: "protocol.RoundInstructions") -> LossHook | None:
        """An extra local loss term with its own per-step work (None for FedAvg)."""
        return None

    def client_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """After training: what this node keeps on its own disk (``{"model": local keys}`` by default)."""
        keys = self.local_keys(model)
        if not keys:
            return {}
        state = model.state_dict()
        return {"model": {k: state[k].detach().to("cpu", copy=True) for k in keys}}

    def client_arrays(self) -> dict[str, torch.Tensor]:
        """Extra arrays a client uploads beside the model: the keys of :meth:`server_arrays` (none by default)."""
        return {}

    def describe(self) -> str:
        """The options in effect, e.g. ``fedprox(proximal-mu=0.01)``."""
        values = ", ".join(f"{o.name}={getattr(self, o.argument, o.default)}" for o in self.options)
        return f"{self.name}({values})" if values else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flower={type(self.flower).__name__})"
