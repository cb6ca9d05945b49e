"""The one guard against bad train replies, run before any aggregation (on by default).

A reply is rejected when any array holds NaN or Inf, has another shape or dtype than the server's
tensor of that key, when keys are missing or unexpected, or when its example count is NaN, zero
or negative; a second reply for the same partition in one round is rejected by the round's
bookkeeping (``server.rounds.classify_replies``), which calls :func:`check_reply` for every reply
and counts each rejection, with its reason, as a failure of the round. The guard sees the decoded
arrays (any compressed transport is decoded before it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ArraySpec:
    """What one uploaded array must look like."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "ArraySpec":
        return cls(tuple(tensor.shape), str(tensor.detach().cpu().numpy().dtype))


def expected_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, ArraySpec]:
    """The specs an upload of these keys must match (from the server's own tensors)."""
    return {k: ArraySpec.of(v) for k, v in tensors.items()}


def check_reply(arrays, num_examples, expected: Mapping[str, ArraySpec]) -> str | None:
    """Why a train reply must be rejected, or None when it is fine.

    Parameters
    ----------
    arrays : flwr.app.ArrayRecord or None
        The reply's uploaded arrays.
    num_examples : float or None
        Its aggregation weight.
    expected : mapping of str to ArraySpec
        Every key it must upload (no more, no less) and its shape and dtype.

    Returns
    -------
    str or None
        The first reason found, phrased for a log line.
    """
    if num_examples is None:
        return "no 'num-examples' metric"
    weight = float(num_examples)
    if not math.isfinite(weight) or weight <= 0:
        return f"num-examples is {weight!r} (must be a finite number > 0)"
    got = set(arrays.keys()) if arrays is not None else set()
    want = set(expected)
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        return (f"uploaded {len(got)} tensors, expected the {len(want)} asked for ({len(extra)} unexpected, e.g. {extra[:2]}; "
                f"{len(missing)} missing, e.g. {missing[:2]})")
    for key in sorted(want):
        spec, array = expected[key], arrays[key]
        if tuple(array.shape) != spec.shape:
            return f"{key}: shape {tuple(array.shape)}, expected {spec.shape}"
        if str(array.dtype) != spec.dtype:
            return f"{key}: dtype {array.dtype}, expected {spec.dtype}"
        values = array.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            return f"{key}: {bad} NaN/Inf value(s)"
    return None
