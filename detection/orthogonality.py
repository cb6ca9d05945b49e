"""Orthogonality regulariser on neck and head conv weights (FedSTO's orthogonal enhancement).

Each conv weight W is reshaped to ``C_out x (C_in/groups * k * k)``. The paper writes
``sigma(W^T W - I) + sigma(W W^T - I)`` with sigma the spectral norm. For a non-square W the larger
Gram matrix has rank at most the smaller side, so it has a zero eigenvalue and
``sigma(larger Gram - I) >= 1`` whatever W is: a constant that gives no useful gradient. The
default (``srip``, as in SRIP, Bansal et al. 2018) keeps only the smaller Gram; ``symmetric`` is
the paper's literal form. Sigma comes from power iteration, with the vector kept between calls
(like ``torch.nn.utils.spectral_norm``), so one or two iterations per step suffice.

Grouped convolutions are regularised per group (each group's filters are a separate W);
depthwise convolutions (one input channel per group) are skipped: each of their "matrices" is a
single k*k filter, for which orthogonality means only "unit norm", not decorrelated filters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from detection.model import is_fixed_parameter, modules_of_group

FORMS = ("srip", "symmetric")
# FedSTO regularises the neck and the head (the backbone is what phase 1 shares).
ORTHO_GROUPS = ("neck", "head")


def weight_matrices(conv: torch.nn.Conv2d) -> list[torch.Tensor]:
    """The 2-D matrices regularised for one conv: one per group, ``C_out/g x C_in/g*k*k``."""
    w = conv.weight
    g = conv.groups
    if w.shape[1] == 1 and g > 1:  # depthwise: skipped, see module docstring
        return []
    return list(w.reshape(g, w.shape[0] // g, -1).unbind(0))


def gram_deviations(w: torch.Tensor, form: str = "srip") -> list[torch.Tensor]:
    """``Gram - I`` matrices whose spectral norms make the penalty of one weight matrix."""
    if form not in FORMS:
        raise ValueError(f"orthogonality form {form!r}: expected one of {FORMS}")
    small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eye_small = torch.eye(small.shape[0], device=w.device, dtype=w.dtype)
    if form == "srip":
        return [small - eye_small]
    large = w.T @ w if w.shape[0] <= w.shape[1] else w @ w.T
    return [small - eye_small, large - torch.eye(large.shape[0], device=w.device, dtype=w.dtype)]


def spectral_norm_power(m: torch.Tensor, v: torch.Tensor, iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral norm of ``m`` by power iteration from ``v``; returns (sigma, next v).

    Iterations run without gradient; sigma = ||m v|| is differentiable in ``m`` with ``v`` fixed.
    """
    with torch.no_grad():
        for _ in range(iterations):
            v = F.normalize(m.T @ (m @ v), dim=0)
    return torch.linalg.vector_norm(m @ v), v


class OrthogonalityRegulariser:
    """Callable penalty ``coefficient * sum sigma(Gram - I)`` over the conv weights of some groups.

    Parameters
    ----------
    model : DetectionModel
        The model whose weights are regularised (the same object that trains).
    groups : iterable of str
        Parameter groups to regularise (FedSTO: neck and head).
    form : str
        ``srip`` (default) or ``symmetric`` (the paper's literal form).
    coefficient : float
        Lambda; the paper does not give it.
    power_iterations : int
        Iterations per call; the vectors persist between calls.
    """

    def __init__(self, model: torch.nn.Module, groups: Iterable[str] = ORTHO_GROUPS, form: str = "srip",
                 coefficient: float = 1e-4, power_iterations: int = 2, seed: int = 0):
        if form not in FORMS:
            raise ValueError(f"orthogonality form {form!r}: expected one of {FORMS}")
        self.form, self.coefficient, self.power_iterations = form, float(coefficient), int(power_iterations)
        self.convs = [m for g in groups for layer in modules_of_group(model, g)
                      for name, m in layer.named_modules()
                      if isinstance(m, torch.nn.Conv2d) and not is_fixed_parameter(f"{name}.weight")]
        if not self.convs:
            raise ValueError(f"no conv layers in groups {list(groups)}")
        self._generator = torch.Generator().manual_seed(seed)
        self._vectors: dict[tuple[int, int, int], torch.Tensor] = {}

    def _vector(self, key: tuple[int, int, int], size: int, like: torch.Tensor) -> torch.Tensor:
        v = self._vectors.get(key)
        if v is None or v.shape[0] != size:
            v = F.normalize(torch.randn(size, generator=self._generator), dim=0)
        return v.to(device=like.device, dtype=like.dtype)

    def penalty(self) -> torch.Tensor:
        """Sum of spectral norms (without the coefficient)."""
        total = None
        for ci, conv in enumerate(self.convs):
            for gi, w in enumerate(weight_matrices(conv)):
                for di, dev in enumerate(gram_deviations(w, self.form)):
                    key = (ci, gi, di)
                    sigma, v = spectral_norm_power(dev, self._vector(key, dev.shape[0], dev), self.power_iterations)
                    self._vectors[key] = v.detach()
                    total = sigma if total is None else total + sigma
        return total

    def __call__(self) -> torch.Tensor:
        return self.coefficient * self.penalty()
