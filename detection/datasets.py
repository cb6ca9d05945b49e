"""Dataset readers: YOLO folders and BDD100K JSON become :class:`~detection.records.ImageRecord` lists.

The readers are :func:`detection.yolo.read_yolo_dataset` and :func:`detection.bdd100k.read_bdd100k`;
both decode images with :mod:`detection.probe`. This module holds what they share: the bad input
policy below, :class:`DatasetError`, the box rules, and :func:`detect_format`.

Every reader returns ``(records, class_names, report)``: the images that survived, the class list
the records' ids index into, and a :class:`~detection.records.SkipReport` that counts everything
that was skipped, dropped or repaired (with a few example ``file:line`` locations per reason).

Bad input policy
----------------
Structural problems (the input cannot mean what the reader would have to assume) raise
:class:`DatasetError` with the file, the line or frame and what was expected. Problems that only
lose a part of the data are counted in the report, never skipped silently. ``strict`` decides for
the content problems in between; its default differs per reader because dropping unwanted
BDD100K categories (traffic lights, trains, ...) is routine while an out-of-range YOLO class id
almost always means a wrong ``names`` list.

====================================  ==========================================================
Problem                               What happens
====================================  ==========================================================
image listed but not on disk          image skipped, counted ``missing image``
image corrupt or truncated            image skipped, counted ``corrupt image``; every image is
                                      fully decoded with Pillow (OpenCV returns a half-grey
                                      picture for a truncated JPEG and no error)
label file missing (YOLO)             image kept as background, counted ``missing label file``
label file empty (YOLO)               image kept as background, counted ``empty label file``
malformed line (YOLO)                 :class:`DatasetError` naming ``file:line`` and the line
                                      text: field count neither 5 nor a polygon, not a number,
                                      NaN/inf, non-integer class id
class id out of range (YOLO)          ``strict=True`` (YOLO default): :class:`DatasetError`
                                      naming ``file:line`` and the valid range;
                                      ``strict=False``: box dropped, counted
                                      ``class id out of range``
unmapped category (BDD100K)           ``strict=False`` (BDD100K default): box dropped, counted
                                      per category as ``unmapped category '<name>'``;
                                      ``strict=True``: :class:`DatasetError`
box overshoots by <= tolerance        clipped to the image, counted ``box clipped to image``;
                                      tolerance ``BOX_TOLERANCE`` = 1e-3 of the image size
                                      (BDD100K: at least 1 px)
box further outside the image         ``strict=True``: :class:`DatasetError` naming the file and
                                      line (YOLO) or frame and label (BDD100K);
                                      ``strict=False``: box dropped, counted
                                      ``box outside image``
box width or height <= 0              box dropped, counted ``non-positive box size`` (checked
                                      after clipping)
same box twice in one image           duplicate dropped, counted ``duplicate box``
polygon row (YOLO segment format)     converted to its bounding box, counted
                                      ``polygon converted to box`` (as Ultralytics does)
BDD100K label without ``box2d``       label dropped, counted ``label without box2d``
image listed twice                    second entry skipped, counted ``duplicate image entry``
split folder reused by another split  read once, counted ``split reuses another split's
                                      images`` (``val: images`` equal to ``train``)
non-image file in an image folder     ignored, counted ``non-image file ignored``
malformed JSON / data.yaml / names    :class:`DatasetError` naming the file and key or frame
====================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detection.records import SkipReport

BOX_TOLERANCE = 1e-3
"""How far (in normalised units) a box may overshoot the image and still be clipped, not rejected."""


class DatasetError(ValueError):
    """Input data that cannot be read as asked; the message names the file (and line) and the fix."""


# --------------------------------------------------------------------------------------------
# Boxes


def clip_or_reject_box(
    x1: float, y1: float, x2: float, y2: float, tolerance: float = BOX_TOLERANCE
) -> tuple[str, tuple]:
    """Decide what to do with one normalised ``xyxy`` box.

    Parameters
    ----------
    x1, y1, x2, y2 : float
        Corners in image-normalised units.
    tolerance : float
        Largest overshoot outside ``[0, 1]`` that is clipped rather than rejected.

    Returns
    -------
    verdict : str
        ``"ok"``, ``"clipped"``, ``"outside"`` (overshoot beyond tolerance) or ``"empty"``
        (non-positive width or height after clipping).
    box : tuple of float
        The (possibly clipped) corners.
    """
    overshoot = max(-x1, -y1, x2 - 1.0, y2 - 1.0)
    if overshoot > tolerance:
        return "outside", (x1, y1, x2, y2)
    verdict = "ok"
    if overshoot > 0:
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
        verdict = "clipped"
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return "empty", (x1, y1, x2, y2)
    return verdict, (x1, y1, x2, y2)


def xyxy_to_xywh(box: Sequence[float]) -> tuple[float, float, float, float]:
    """Corners -> centre/size (same units)."""
    x1, y1, x2, y2 = box
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def drop_duplicate_boxes(classes: list[int], boxes: list[tuple], where: str, report: SkipReport) -> tuple[list, list]:
    """Drop repeats of the same ``(class, box)`` (6 decimals), counting each as ``duplicate box``."""
    seen: set[tuple] = set()
    kept_c, kept_b = [], []
    for c, b in zip(classes, boxes):
        key = (c, *(round(v, 6) for v in b))
        if key in seen:
            report.add("duplicate box", where)
            continue
        seen.add(key)
        kept_c.append(c)
        kept_b.append(b)
    return kept_c, kept_b


# --------------------------------------------------------------------------------------------
# Auto-detection


def detect_format(source: str | Path) -> str:
    """Guess whether ``source`` is a YOLO dataset or BDD100K labels.

    Parameters
    ----------
    source : str or Path
        A yaml, a JSON file, or a folder.

    Returns
    -------
    str
        ``"yolo"`` or ``"bdd100k"``.

    Raises
    ------
    DatasetError
        If neither layout is recognised.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset {source} does not exist")
    if source.is_file():
        if source.suffix in (".yaml", ".yml"):
            return "yolo"
        if source.suffix == ".json":
            return "bdd100k"
    elif find_yaml(source) is not None or ((source / "images").is_dir() and not bdd_labels_in(source)):
        return "yolo"
    elif bdd_labels_in(source) or any(source.glob("*.json")):
        return "bdd100k"
    raise DatasetError(
        f"{source}: neither a YOLO dataset (data.yaml or images/+labels/) nor BDD100K labels (.json); pass --format"
    )


def bdd_labels_in(folder: Path) -> bool:
    """True if ``folder/labels`` holds BDD100K label JSON files."""
    return (folder / "labels").is_dir() and any((folder / "labels").glob("*.json"))


def find_yaml(folder: Path) -> Path | None:
    """The YOLO ``data.yaml`` of ``folder``: a usual name, else its only yaml; None if there is none or several."""
    for name in ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml"):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    return candidates[0] if len(candidates) == 1 else None
