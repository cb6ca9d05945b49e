"""Seeds for independent random streams, derived from the run seed and integer tags."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of integers (seed, round, node, step, ...), stable across machines.

    Each distinct tuple starts an independent stream (``numpy.random.SeedSequence``), so a fixed
    tag (e.g. a sampling stream id) keeps one use of the seed apart from every other.
    """
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
