"""Adaptive federated optimisation (Reddi et al., ICLR 2021): FedAdam, FedYogi, FedAdagrad.

Each delegates its step to its ``flwr.serverapp.strategy`` class. Flower's FedOpt stores the
current arrays in ``configure_train`` and computes ``delta = aggregate - current`` over exactly
the aggregate's keys, so it is given the round's uploaded parameter keys (phase 1: backbone only)
before each round; it never samples (``min_*`` = 0, no nodes). Its moments ``m_t``/``v_t`` are
created from the first aggregate's keys; here they are kept by key across rounds, so the phase 1
-> phase 2 change extends them: neck and head keys start with zero moments, the backbone's keep
theirs. Moments are saved in every server checkpoint and restored on resume.

``eta`` is the server step per element and round, after normalisation by ``sqrt(v)``: it moves
every weight by up to about ``eta`` per round whatever the gradient's scale. Flower's default
(0.1 for FedAdam) is far larger than typical convolution weights of a small detector
(|w| ~ 0.01-0.1), so the default here is 1e-3; ``tau`` bounds the step where ``v`` is tiny and
should stay below ``eta``. Measured (``python -m benchmarks.strategy_table``: yolo11n at 128 px,
7 clients, one warm start, 1 + 1 FedSTO rounds; Total mAP50 of the final global model, FedAvg
0.205): FedAdam ``eta=1e-4`` 0.190, ``1e-3`` 0.204, ``1e-2`` 0.001, ``1e-1`` 0.001. So use
``eta`` in 1e-4 .. 1e-3; from 1e-2 up, two server steps wipe out the detector.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi

from strategies.base import NO_SAMPLING, NoNodes, StrategyOption
from strategies.server_optimiser import ServerOptimiserStrategy

ETA = StrategyOption("eta", float, 1e-3, "server step size (per element per round; see docs)")
TAU = StrategyOption("tau", float, 1e-9, "adaptivity floor in the denominator sqrt(v) + tau")
BETA_1 = StrategyOption("beta-1", float, 0.9, "first-moment decay")
BETA_2 = StrategyOption("beta-2", float, 0.99, "second-moment decay")


class _FedOpt(ServerOptimiserStrategy):
    """A FedOpt step with moments kept by key (see the module docstring)."""

    flower_class: type = FedAdam
    options = (ETA, TAU, BETA_1, BETA_2)

    def __init__(self, eta: float = 1e-3, tau: float = 1e-9, beta_1: float = 0.9, beta_2: float = 0.99) -> None:
        self.eta, self.tau, self.beta_1, self.beta_2 = eta, tau, beta_1, beta_2
        kwargs = {"eta": eta, "tau": tau}
        if self.flower_class is not FedAdagrad:
            kwargs.update(beta_1=beta_1, beta_2=beta_2)
        super().__init__(self.flower_class(**NO_SAMPLING, **kwargs))
        self.m_t: dict[str, np.ndarray] = {}
        self.v_t: dict[str, np.ndarray] = {}

    def step(self, server_round, replies, current):
        # configure_train stores the current arrays (and samples no node: min_* = 0, no nodes).
        list(self.flower.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(), NoNodes()))
        self.flower.m_t = self._keyed(self.m_t, current)
        self.flower.v_t = self._keyed(self.v_t, current)
        arrays, _ = self.flower.aggregate_train(server_round, replies)
        self.m_t.update(self.flower.m_t)
        self.v_t.update(self.flower.v_t)
        return {k: arrays[k].numpy() for k in current}

    def state_dict(self):
        return {"m_t": dict(self.m_t), "v_t": dict(self.v_t)}

    def load_state_dict(self, state):
        self.m_t, self.v_t = dict(state.get("m_t", {})), dict(state.get("v_t", {}))


class FedAdamStrategy(_FedOpt):
    """FedAdam, by ``flwr.serverapp.strategy.FedAdam`` (options: eta, tau, beta-1, beta-2)."""

    name = "fedadam"
    description = "server-side Adam on the averaged update (Reddi et al., ICLR 2021)"
    flower_class = FedAdam


class FedYogiStrategy(_FedOpt):
    """FedYogi, by ``flwr.serverapp.strategy.FedYogi`` (options: eta, tau, beta-1, beta-2)."""

    name = "fedyogi"
    description = "server-side Yogi on the averaged update (Reddi et al., ICLR 2021)"
    flower_class = FedYogi


class FedAdagradStrategy(_FedOpt):
    """FedAdagrad, by ``flwr.serverapp.strategy.FedAdagrad`` (options: eta, tau)."""

    name = "fedadagrad"
    description = "server-side Adagrad on the averaged update (Reddi et al., ICLR 2021)"
    flower_class = FedAdagrad
    options = (ETA, TAU)

    def __init__(self, eta: float = 1e-3, tau: float = 1e-9) -> None:
        super().__init__(eta=eta, tau=tau)
