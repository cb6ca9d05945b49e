"""FedBN (Li et al., ICLR 2021): every BatchNorm layer stays on its client; the rest is averaged."""

from __future__ import annotations

import torch

from strategies.fedavg import FedAvgStrategy


def batchnorm_keys(model: torch.nn.Module) -> list[str]:
    """State keys of every BatchNorm module, found by type: weight, bias, running mean and variance, batch counter."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


class FedBNStrategy(FedAvgStrategy):
    """FedAvg of everything but BatchNorm; each client keeps its own BatchNorm across rounds.

    The server never receives or averages a client's BatchNorm (it is not uploaded). The broadcast
    still holds the server's BatchNorm, so a client sampled for the first time starts from it;
    after its first round a client loads its own saved BatchNorm on top of every broadcast (saved
    on the node's disk, so it survives a resume or a SuperNode restart). In FedSTO's phase 1 the
    neck and head are frozen, and their BatchNorm, in eval mode, stays the client's own as well.
    The global model keeps the server's BatchNorm: evaluate a client's personalised model
    (``eval-personal``) to see what FedBN does for its domain.
    """

    name = "fedbn"
    description = "FedAvg with every BatchNorm layer kept local on the clients (Li et al., ICLR 2021)"

    def local_keys(self, model: torch.nn.Module) -> list[str]:
        return batchnorm_keys(model)
