"""Byzantine-robust aggregation rules from Flower: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan.

Each needs enough replies per round (Krum: ``2f + 3`` for ``f`` malicious nodes, Bulyan:
``4f + 3``); the ServerApp checks this before round 1 (:meth:`check_round_size`), so a run that
could not aggregate fails at once in one line instead of with "no aggregate" in some round.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from strategies.base import NO_SAMPLING, FederatedStrategy, StrategyError, StrategyOption

MALICIOUS = StrategyOption("num-malicious-nodes", int, 1, "f: malicious replies to tolerate per round")


class FedMedianStrategy(FederatedStrategy):
    """Coordinate-wise median of the uploads (Yin et al., 2018)."""

    name = "fedmedian"
    description = "coordinate-wise median of the uploads (Yin et al., 2018)"

    def __init__(self) -> None:
        super().__init__(FedMedian(**NO_SAMPLING))


class FedTrimmedAvgStrategy(FederatedStrategy):
    """Coordinate-wise mean after cutting the ``beta`` share of largest and smallest values (Yin et al., 2018).

    Parameters
    ----------
    beta : float (default: 0.2)
        Share cut at each end, in [0, 0.5).
    """

    name = "fedtrimmedavg"
    description = "coordinate-wise trimmed mean (Yin et al., 2018)"
    options = (StrategyOption("beta", float, 0.2, "share of values cut at each end, in [0, 0.5)"),)

    def __init__(self, beta: float = 0.2) -> None:
        if not 0 <= beta < 0.5:
            raise StrategyError(f"fedtrimmedavg beta={beta}: expected a number in [0, 0.5)")
        self.beta = beta
        super().__init__(FedTrimmedAvg(**NO_SAMPLING, beta=beta))


class KrumStrategy(FederatedStrategy):
    """The upload closest to its ``n - f - 2`` nearest neighbours (Blanchard et al., 2017).

    Parameters
    ----------
    num_malicious_nodes : int (default: 1)
        ``f``; a round needs ``2f + 3`` replies.
    """

    name = "krum"
    description = "the upload nearest to its n-f-2 neighbours (Blanchard et al., 2017)"
    options = (MALICIOUS,)

    def __init__(self, num_malicious_nodes: int = 1) -> None:
        if num_malicious_nodes < 0:
            raise StrategyError(f"{self.name} num-malicious-nodes={num_malicious_nodes}: expected an integer >= 0")
        self.num_malicious_nodes = num_malicious_nodes
        super().__init__(self._flower())

    def _flower(self):
        return Krum(**NO_SAMPLING, num_malicious_nodes=self.num_malicious_nodes)

    def min_replies(self) -> int:
        return 2 * self.num_malicious_nodes + 3

    def min_replies_rule(self) -> str:
        return f"2f+3 with num-malicious-nodes f={self.num_malicious_nodes}"


class MultiKrumStrategy(KrumStrategy):
    """The mean of the ``m`` uploads with the best Krum scores (El Mhamdi et al., 2018).

    Parameters
    ----------
    num_malicious_nodes : int (default: 1)
        ``f``; a round needs ``max(2f + 3, m)`` replies.
    num_nodes_to_select : int (default: 3)
        ``m``, the uploads averaged.
    """

    name = "multikrum"
    description = "mean of the m uploads with the best Krum scores (El Mhamdi et al., 2018)"
    options = (MALICIOUS, StrategyOption("num-nodes-to-select", int, 3, "m: uploads averaged"))

    def __init__(self, num_malicious_nodes: int = 1, num_nodes_to_select: int = 3) -> None:
        self.num_nodes_to_select = num_nodes_to_select
        super().__init__(num_malicious_nodes)

    def _flower(self):
        return MultiKrum(**NO_SAMPLING, num_malicious_nodes=self.num_malicious_nodes,
                         num_nodes_to_select=self.num_nodes_to_select)

    def min_replies(self) -> int:
        return max(2 * self.num_malicious_nodes + 3, self.num_nodes_to_select)

    def min_replies_rule(self) -> str:
        return (f"max(2f+3, m) with num-malicious-nodes f={self.num_malicious_nodes}, "
                f"num-nodes-to-select m={self.num_nodes_to_select}")


class BulyanStrategy(KrumStrategy):
    """Krum selection, then a coordinate-wise trimmed mean around the median (El Mhamdi et al., 2018).

    Parameters
    ----------
    num_malicious_nodes : int (default: 1)
        ``f``; a round needs ``4f + 3`` replies.
    """

    name = "bulyan"
    description = "Krum selection then a trimmed mean around the median (El Mhamdi et al., 2018)"
    options = (MALICIOUS,)

    def _flower(self):
        return Bulyan(**NO_SAMPLING, num_malicious_nodes=self.num_malicious_nodes)

    def min_replies(self) -> int:
        return 4 * self.num_malicious_nodes + 3

    def min_replies_rule(self) -> str:
        return f"4f+3 with num-malicious-nodes f={self.num_malicious_nodes}"
