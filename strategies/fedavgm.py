"""FedAvgM (Hsu et al., 2019): FedAvg with a server learning rate and server momentum."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvgM

from strategies.base import NO_SAMPLING, StrategyOption
from strategies.server_optimiser import ServerOptimiserStrategy


class FedAvgMStrategy(ServerOptimiserStrategy):
    """Server momentum on the averaged update, by ``flwr.serverapp.strategy.FedAvgM``.

    Flower's FedAvgM takes its current arrays once and pairs arrays by position; here it is given
    the server's current state (after its server epoch) every round, in the aggregate's key
    order, and its momentum is kept by key (new keys start at zero).

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Step on the pseudo-gradient ``current - average`` (1 and momentum 0: FedAvg).
    server_momentum : float (default: 0.9)
        Momentum of the pseudo-gradient across rounds.
    """

    name = "fedavgm"
    description = "FedAvg with server learning rate and momentum (Hsu et al., 2019)"
    options = (StrategyOption("server-learning-rate", float, 1.0, "step on the pseudo-gradient"),
               StrategyOption("server-momentum", float, 0.9, "momentum of the pseudo-gradient across rounds"))

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum
        super().__init__(FedAvgM(**NO_SAMPLING, server_learning_rate=server_learning_rate, server_momentum=server_momentum))
        self.momentum: dict[str, np.ndarray] = {}

    def step(self, server_round, replies, current):
        keys = list(current)
        self.flower.current_arrays = ArrayRecord({k: Array(current[k]) for k in keys})
        self.flower.momentum_vector = list(self._keyed(self.momentum, current).values()) if self.momentum else None
        arrays, _ = self.flower.aggregate_train(server_round, replies)
        if self.flower.momentum_vector is not None:
            self.momentum.update(zip(keys, (np.asarray(v) for v in self.flower.momentum_vector)))
        return {k: arrays[k].numpy() for k in keys}

    def state_dict(self):
        return {"momentum": dict(self.momentum)}

    def load_state_dict(self, state):
        self.momentum = dict(state.get("momentum", {}))
