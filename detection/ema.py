"""The local EMA teacher: a copy of the student whose weights follow it as an exponential moving average.

FedSTO re-initialises the teacher from the broadcast model every round and updates it after
every optimiser step with decay 0.999. With a few dozen local steps per round such a teacher
barely moves (0.999**50 = 0.95), so ``auto`` derives the decay from the round's step count:
a half-life of a quarter of the round.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch


def auto_ema_decay(num_steps: int, half_life_fraction: float = 0.25) -> float:
    """Decay whose half-life is ``half_life_fraction`` of ``num_steps`` optimiser steps.

    ``decay ** (half_life_fraction * num_steps) == 0.5``; clipped to [0.5, 0.9999].
    """
    half_life = max(1.0, half_life_fraction * max(1, num_steps))
    return float(min(0.9999, max(0.5, 0.5 ** (1.0 / half_life))))


def parse_ema_decay(decay: float | str) -> float | str:
    """``"auto"`` or the decay as a float in (0, 1), from a number or its text.

    Raises
    ------
    ValueError
        For anything else (the message names ``ema-decay`` and what is expected).
    """
    if isinstance(decay, str) and decay.strip().lower() == "auto":
        return "auto"
    try:
        value = float(decay)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ValueError(f"ema-decay={decay!r}: expected 'auto' or a number in (0, 1)")
    return value


def resolve_ema_decay(decay: float | str, num_steps: int) -> float:
    """A float decay, or ``"auto"`` resolved from the number of local steps."""
    value = parse_ema_decay(decay)
    return auto_ema_decay(num_steps) if value == "auto" else value


def ema_update_(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor], decay: float) -> None:
    """In place: ``t = decay * t + (1 - decay) * s`` for float tensors; other tensors (counters) are copied."""
    with torch.no_grad():
        for key, t in teacher.items():
            s = student[key].detach()
            if t.dtype.is_floating_point:
                t.mul_(decay).add_(s.to(t.dtype), alpha=1.0 - decay)
            else:
                t.copy_(s)


class EmaTeacher:
    """A frozen, eval-mode copy of a model, updated as an EMA of the student.

    Parameters
    ----------
    model : torch.nn.Module
        The student; the teacher starts as an exact copy of it.
    decay : float
        EMA decay per update.
    ramp : bool
        Mean-teacher style warm start: use ``min(decay, (1 + t) / (10 + t))`` at update ``t``, so the
        first updates move the teacher more.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, ramp: bool = False):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.ramp = ramp
        self.updates = 0

    def reset(self, source: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Make the teacher equal to the given model or state dict (start of a round)."""
        state = source.state_dict() if isinstance(source, torch.nn.Module) else source
        with torch.no_grad():
            for key, t in self.model.state_dict().items():
                t.copy_(state[key])
        self.updates = 0

    def current_decay(self) -> float:
        if self.ramp:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    def update(self, student: torch.nn.Module) -> None:
        """One EMA step towards the student's current weights and BatchNorm statistics."""
        ema_update_(self.model.state_dict(), student.state_dict(), self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        return self.model(images)
