"""The shared part of the adaptive server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad).

Their step applies to the model's float parameters only; BatchNorm buffers (running mean and
variance, batch counters) and any extra arrays are plainly averaged, because an Adam step on
``running_var`` can make it negative. Flower's classes keep per-key state (moments) created from
the first aggregate's keys; FedSTO's phase 2 uploads neck and head keys phase 1 never sent, so the
state is kept here by key across rounds: a key seen for the first time starts with zero state,
keys seen before keep theirs (``state_dict`` saves it in the server checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

from strategies.base import NO_SAMPLING, FederatedStrategy, RoundContext, aggregation_view, sort_replies_by_partition


class ServerOptimiserStrategy(FederatedStrategy):
    """Base of the server-side optimisers: :meth:`step` on parameters, FedAvg on the rest.

    Parameters
    ----------
    flower_strategy : flwr.serverapp.strategy.Strategy
        The optimiser's Flower class (built with :data:`strategies.base.NO_SAMPLING`).
    """

    def __init__(self, flower_strategy) -> None:
        super().__init__(flower_strategy)
        self.averaging = FedAvg(**NO_SAMPLING)
        self.round: RoundContext | None = None

    def configure_round(self, context: RoundContext) -> None:
        self.round = context

    def step(self, server_round: int, replies: Sequence[Message], current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The optimiser's new parameters from the replies (parameter keys only) and the current ones."""
        raise NotImplementedError

    def aggregate(self, server_round, replies):
        if self.round is None or self.round.server_round != server_round:
            raise RuntimeError(f"{self.name}: configure_round was not called for round {server_round}")
        ordered = sort_replies_by_partition(replies)
        keys = list(next(iter(ordered[0].content.array_records.values())).keys())
        adaptive = [k for k in keys if k in self.round.parameter_keys]
        plain = [k for k in keys if k not in self.round.parameter_keys]
        out: dict[str, torch.Tensor] = {}
        metrics = None
        if adaptive:
            current = {k: self.round.global_state[k].detach().cpu().numpy() for k in adaptive}
            views = [aggregation_view(m, self.weight_key, adaptive) for m in ordered]
            new = self.step(server_round, views, current)
            out.update({k: torch.as_tensor(np.asarray(v, dtype=current[k].dtype)) for k, v in new.items()})
        if plain:
            arrays, metrics = self.averaging.aggregate_train(server_round, [aggregation_view(m, self.weight_key, plain) for m in ordered])
            out.update({k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()})
        return out, metrics

    @staticmethod
    def _keyed(store: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-key state for exactly the current keys (new keys: zeros)."""
        return {k: store[k] if k in store else np.zeros_like(v) for k, v in current.items()}
