"""Image records: the one in-memory form of a labelled (or unlabelled) image in the project.

Boxes are YOLO-normalised ``xywh`` (centre x, centre y, width, height in [0, 1]); classes are
integer ids into the dataset's class list. Images on disk are read as RGB ``uint8`` arrays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ImageRecord:
    """One image and its boxes.

    Parameters
    ----------
    path : str
        Absolute path of the image file.
    classes : np.ndarray
        ``(N,)`` int64 class ids.
    boxes : np.ndarray
        ``(N, 4)`` float32 normalised ``xywh`` boxes.
    domain : str
        Domain name (``clear``, ``rainy``, a BDD100K weather value, a folder name, ...).
    attributes : dict
        Free-form per-image attributes (e.g. BDD100K ``weather``/``timeofday``/``scene``).
    """

    path: str
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    domain: str = "default"
    attributes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if len(self.classes) != len(self.boxes):
            raise ValueError(f"{self.path}: {len(self.classes)} classes but {len(self.boxes)} boxes")

    @property
    def labels(self) -> list[list[float]]:
        """Boxes as JSON-friendly rows ``[class, x, y, w, h]``."""
        return [[int(c), *map(float, b)] for c, b in zip(self.classes, self.boxes)]

    @classmethod
    def from_labels(cls, path: str | Path, labels: list, domain: str = "default", **kw) -> "ImageRecord":
        """Build a record from rows ``[class, x, y, w, h]`` (the manifest's form)."""
        rows = np.asarray(labels, dtype=np.float64).reshape(-1, 5)
        return cls(str(path), rows[:, 0].astype(np.int64), rows[:, 1:].astype(np.float32), domain, dict(kw))


class SkipReport:
    """Counts what a reader skipped or repaired, by reason, with a few example files per reason.

    Nothing is skipped silently: every reader returns one of these and the CLI prints it.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str | Path) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(where))

    def merge(self, other: "SkipReport") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            for ex in other.examples.get(reason, []):
                if len(self.examples.setdefault(reason, [])) < 3:
                    self.examples[reason].append(ex)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples.get(reason, [])} for reason, n in self.counts.items()}

    def __str__(self) -> str:
        if not self.counts:
            return "nothing skipped"
        return "; ".join(f"{reason}: {n} (e.g. {self.examples[reason][0]})" for reason, n in self.counts.items())
