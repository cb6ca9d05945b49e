"""A client's local state on the node's own disk: it outlasts a resumed run and a restarted SuperNode.

What a strategy keeps (FedBN's BatchNorm, FRAug's RTNet and its optimiser) is saved after every
round the node trains, under ``<state dir>/<run key>/partition-<id>/round-<r>.pt``. The run key
is the project's (``RoundInstructions.run_key``, the same on ``resume``), not Flower's run id,
which changes on every ``flwr run``. Loading takes the newest round *before* the current one, so
a round that is redone after a crash starts from exactly what the node had before it. Nothing in
here is ever sent to the server.

The folder comes from the node config (``--node-config 'state-dir="/var/lib/fedsto"'``), else
``$FEDSTO_HOME/node-state`` (simulation).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detection.ultralytics_env import fedsto_home

NODE_CONFIG_KEY = "state-dir"
KEEP_ROUNDS = 2
_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")


class NodeStateStore:
    """Saved local state of one partition in one run.

    Parameters
    ----------
    root : path
        The node's state folder.
    run_key : str
        The project's run id.
    partition_id : int
        This node's partition.
    """

    def __init__(self, root: str | os.PathLike, run_key: str, partition_id: int) -> None:
        if not run_key or "/" in run_key or run_key.startswith("."):
            raise ValueError(f"run key {run_key!r}: expected a plain folder name")
        self.folder = Path(root) / run_key / f"partition-{int(partition_id)}"

    @classmethod
    def for_node(cls, node_config: Mapping, run_key: str, partition_id: int) -> "NodeStateStore":
        root = node_config.get(NODE_CONFIG_KEY) or (fedsto_home() / "node-state")
        return cls(os.path.expanduser(str(root)), run_key, partition_id)

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _ROUND_FILE.search(p.name)))

    def load(self, before_round: int) -> dict[str, Any]:
        """The state saved after the newest round < ``before_round`` (empty if none: a first-time client)."""
        earlier = [r for r in self.rounds() if r < before_round]
        if not earlier:
            return {}
        return torch.load(self.folder / f"round-{earlier[-1]}.pt", map_location="cpu", weights_only=False)

    def save(self, server_round: int, state: Mapping[str, Any]) -> Path | None:
        """Write the state after ``server_round`` atomically; keep the newest :data:`KEEP_ROUNDS` rounds."""
        if not state:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round-{int(server_round)}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
        for r in self.rounds()[:-KEEP_ROUNDS]:
            (self.folder / f"round-{r}.pt").unlink(missing_ok=True)
        return path
