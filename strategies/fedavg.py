"""FedAvg (McMahan et al., 2017): example-weighted mean of the uploaded tensors."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies import protocol
from strategies.base import NO_SAMPLING, FederatedStrategy


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
    description = "example-weighted mean of the uploads (McMahan et al., 2017)"

    def __init__(self, weighted_by_key: str = protocol.NUM_EXAMPLES) -> None:
        super().__init__(FedAvg(**NO_SAMPLING, weighted_by_key=weighted_by_key), weight_key=weighted_by_key)
