"""FedProx (Li et al., MLSys 2020): FedAvg on the server, a proximal term on every client."""

from __future__ import annotations

import torch
from flwr.serverapp.strategy import FedProx

from detection.loss_hooks import LossContext, LossHook
from strategies.base import NO_SAMPLING, FederatedStrategy, StrategyError, StrategyOption


def proximal_term(model: torch.nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """``mu / 2 * sum ||w - w_global||^2`` over the parameters that train this round."""
    terms = [((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad]
    return 0.5 * mu * torch.stack(terms).sum() if terms else torch.zeros(())


class ProximalLoss(LossHook):
    """The proximal term against the weights the round started from (the broadcast)."""

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        super().__init__()
        self.mu = mu
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(self, context: LossContext):
        device = next(context.model.parameters()).device
        if next(iter(self.anchor.values())).device != device:
            self.anchor = {n: a.to(device) for n, a in self.anchor.items()}
        term = proximal_term(context.model, self.anchor, self.mu)
        return term, {"proximal": float(term.detach())}


class FedProxStrategy(FederatedStrategy):
    """FedAvg aggregation (``flwr.serverapp.strategy.FedProx``) plus the client's proximal term.

    ``proximal-mu`` travels to clients in the round instructions (``strategy-options``), and each
    client adds ``mu / 2 * ||w - w_broadcast||^2`` over its trainable parameters to its loss.

    Parameters
    ----------
    proximal_mu : float (default: 0.01)
        Weight of the proximal term (0: FedAvg).
    """

    name = "fedprox"
    description = "FedAvg plus a proximal term on the clients (Li et al., MLSys 2020)"
    options = (StrategyOption("proximal-mu", float, 0.01, "weight of mu/2 ||w - w_global||^2 in the client loss"),)

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if proximal_mu < 0:
            raise StrategyError(f"fedprox proximal-mu={proximal_mu}: expected a number >= 0")
        self.proximal_mu = proximal_mu
        super().__init__(FedProx(**NO_SAMPLING, proximal_mu=proximal_mu))

    def client_loss(self, model, instructions):
        return ProximalLoss(model, self.proximal_mu) if self.proximal_mu > 0 else None
