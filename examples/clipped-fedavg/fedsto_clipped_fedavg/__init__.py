"""An example fedsto strategy plug-in: FedAvg of norm-clipped client updates, with a server learning rate.

Each client's update ``delta_k = w_k - w`` (its upload minus the round's global weights) is
scaled down to an L2 norm of at most ``clip-norm`` (over the uploaded float parameters), the
clipped updates are averaged with the clients' example weights, and the server moves by
``server-lr`` times that average:

    w <- w + server_lr * sum_k n_k * clip(delta_k, C) / sum_k n_k

Clipping bounds how far one client (a broken one, or one far from the others' data) can drag the
global model in a round; ``server-lr`` < 1 damps every round. With ``clip-norm=inf`` and
``server-lr=1`` this is FedAvg exactly. BatchNorm buffers (running statistics, batch counters)
and extra arrays are plainly averaged: they are statistics, not steps.

Install it next to fedsto and select it by name, nothing else changes::

    pip install examples/clipped-fedavg
    fedsto strategies                       # lists clipped-fedavg with its options
    fedsto run --preset smoke -- strategy=clipped-fedavg strategy-options="clip-norm=5 server-lr=0.5"
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from flwr.serverapp.strategy import FedAvg

from strategies.base import NO_SAMPLING, StrategyError, StrategyOption
from strategies.server_optimiser import ServerOptimiserStrategy


def clip_by_norm(delta: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """``delta`` scaled so that its global L2 norm is at most ``max_norm`` (unchanged if already within)."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return {k: v * scale for k, v in delta.items()}


def clipped_mean_step(current: Mapping[str, torch.Tensor], uploads: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float], max_norm: float, server_lr: float) -> dict[str, torch.Tensor]:
    """``current + server_lr * weighted mean of clip(upload - current)``, in float64, back in each key's dtype."""
    total = float(sum(weights))
    step = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}
    for upload, weight in zip(uploads, weights):
        delta = {k: upload[k].double() - current[k].double() for k in current}
        for k, v in clip_by_norm(delta, max_norm).items():
            step[k] += v * (weight / total)
    return {k: (current[k].double() + server_lr * step[k]).to(current[k].dtype) for k in current}


class ClippedFedAvg(ServerOptimiserStrategy):
    """FedAvg of norm-clipped updates with a server learning rate (see the module docstring).

    Built on :class:`strategies.server_optimiser.ServerOptimiserStrategy`, the base of the
    server optimisers: it keeps the round's global weights (``configure_round``), sorts the
    replies, hands :meth:`step` the float parameters only and averages the rest with FedAvg.

    Parameters
    ----------
    clip_norm : float (default: 10.0)
        ``C``: the largest L2 norm of one client's update (over its uploaded float parameters).
    server_lr : float (default: 1.0)
        The server's step along the mean clipped update.
    """

    name = "clipped-fedavg"
    description = "FedAvg of norm-clipped client updates with a server learning rate (example plug-in)"
    options = (StrategyOption("clip-norm", float, 10.0, "largest L2 norm of one client's update"),
               StrategyOption("server-lr", float, 1.0, "server step along the mean clipped update"))

    def __init__(self, clip_norm: float = 10.0, server_lr: float = 1.0) -> None:
        if not clip_norm > 0:
            raise StrategyError(f"clipped-fedavg clip-norm={clip_norm}: expected a number > 0")
        if not server_lr > 0:
            raise StrategyError(f"clipped-fedavg server-lr={server_lr}: expected a number > 0")
        super().__init__(FedAvg(**NO_SAMPLING))
        self.clip_norm, self.server_lr = clip_norm, server_lr

    def step(self, server_round, replies, current):
        # replies: sorted by partition id, reduced to the parameter keys and the weight
        uploads, weights = [], []
        for reply in replies:
            arrays = next(iter(reply.content.array_records.values()))
            uploads.append({k: torch.from_numpy(arrays[k].numpy()) for k in current})
            weights.append(float(next(iter(reply.content.metric_records.values()))[self.weight_key]))
        new = clipped_mean_step({k: torch.from_numpy(v) for k, v in current.items()}, uploads, weights,
                                self.clip_norm, self.server_lr)
        return {k: v.numpy() for k, v in new.items()}
