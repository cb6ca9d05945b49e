"""What a server checkpoint holds besides the model, and the checkpoint's layout.

A checkpoint is written after every step (``server.rundir.RunDir.save_checkpoint``) and is all
a resumed run needs: the model, the server optimiser's state, the RNG states and
:class:`ServerState`, so a run killed at any point continues with the same numbers.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from detection.model import get_state, set_state


@dataclass
class ServerState:
    """The loop's counters and bookkeeping (plain data: saved with ``dataclasses.asdict``)."""

    step: int = 0
    best_map50: float = -1.0
    best_step: int = 0
    elapsed: float = 0.0
    failures: int = 0
    teacher_checked: bool = False
    last_eval: dict | None = None
    failures_by_step: dict = field(default_factory=dict)
    rejections: list = field(default_factory=list)
    failure_reasons: list = field(default_factory=list)  # every failed reply: {"step", "round", "reason"}; round may be "teacher check"
    site_failures: list = field(default_factory=list)  # discovery / refresh problems: {"step", "where", "reason"}
    last_sites: dict | None = None  # per-site hold-out mAP of the last evaluated round (deployment)


def rng_state() -> dict:
    """The torch, numpy and Python RNG states of this process."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_payload(model: torch.nn.Module, state: ServerState, optimizer_state: dict | None, step: int,
                       phase: str, server_round: int, label: str, run_config: dict[str, Any]) -> dict[str, Any]:
    """Everything a resume needs after ``step`` (``phase``, ``round`` and ``label`` for people reading it)."""
    return {"model_state": get_state(model), "optimizer_state": optimizer_state, "server": asdict(state),
            "rng": rng_state(), "step": step, "phase": phase, "round": server_round, "label": label,
            "config": run_config}


def restore_checkpoint(model: torch.nn.Module, checkpoint: dict[str, Any]) -> tuple[ServerState, dict | None]:
    """Load a checkpoint's model state and RNG states; returns its server state and optimiser state."""
    set_state(model, checkpoint["model_state"])
    set_rng_state(checkpoint["rng"])
    return ServerState(**checkpoint["server"]), checkpoint["optimizer_state"]
