"""FedAvg (McMahan et al., 2017): example-weighted mean of the uploaded tensors."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies import protocol
from strategies.base import FederatedStrategy


class FedAvgStrategy(FederatedStrategy):
    """Federated averaging, aggregated by ``flwr.serverapp.strategy.FedAvg``.

    Every uploaded key is replaced by its mean over the round's replies, weighted by each reply's
    ``num-examples``; nothing stays local on the clients.

    Parameters
    ----------
    weighted_by_key : str (default: "num-examples")
        The reply metric used as the weight.
    """

    name = "fedavg"

    def __init__(self, weighted_by_key: str = protocol.NUM_EXAMPLES) -> None:
        # Sampling and waiting for nodes are done by the ServerApp (by partition id), so FedAvg's
        # own sampling settings are irrelevant here; min_* = 0 keeps it from ever waiting.
        super().__init__(FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0,
                                min_evaluate_nodes=0, min_available_nodes=0, weighted_by_key=weighted_by_key),
                         weight_key=weighted_by_key)
