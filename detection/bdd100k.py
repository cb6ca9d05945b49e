"""The BDD100K reader: ``det`` JSON lists, scalabel ``{"frames": [...]}`` documents, ``box_track`` folders.

:func:`read_bdd100k` returns ``(records, class_names, report)``; what happens to each kind of bad
input is the policy in :mod:`detection.datasets`. :func:`bdd_layout` finds labels and images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detection.datasets import (
    BOX_TOLERANCE,
    DatasetError,
    bdd_labels_in,
    clip_or_reject_box,
    drop_duplicate_boxes,
    xyxy_to_xywh,
)
from detection.probe import probe_images
from detection.records import ImageRecord, SkipReport

FEDSTO_CATEGORY_MAP = {
    "car": "car",
    "bus": "bus",
    "truck": "truck",
    "pedestrian": "person",
    "rider": "person",
    "person": "person",
    "traffic sign": "traffic sign",
}
"""BDD100K category -> class used by the FedSTO paper's five-class setting."""


def category_map_for(classes: Sequence[str]) -> dict[str, str]:
    """Default BDD100K category map for a chosen class list.

    Each class maps to itself, and every :data:`FEDSTO_CATEGORY_MAP` alias whose target is one of
    ``classes`` is added (so ``person`` also collects ``pedestrian`` and ``rider``).

    Parameters
    ----------
    classes : sequence of str

    Returns
    -------
    dict
        BDD100K category -> class name.
    """
    mapping = {c: c for c in classes}
    mapping.update({src: dst for src, dst in FEDSTO_CATEGORY_MAP.items() if dst in mapping})
    return mapping


def load_bdd_frames(labels_json: str | Path) -> list[tuple[str, int, dict]]:
    """Frames of a BDD100K label file or folder of per-video files (``box_track``).

    Parameters
    ----------
    labels_json : str or Path
        A JSON file holding a list of frames (detection format), a scalabel ``{"frames": [...]}``
        document, or a folder of such files (tracking format: one file per video).

    Returns
    -------
    list of (file, index, frame)
        The JSON file and position of each frame, for error messages.

    Raises
    ------
    DatasetError
        If a file is not valid JSON or not a list of frames with a ``name``.
    FileNotFoundError
        If ``labels_json`` does not exist.
    """
    labels_json = Path(labels_json)
    if not labels_json.exists():
        raise FileNotFoundError(f"BDD100K labels {labels_json} do not exist")
    files = sorted(labels_json.glob("*.json")) if labels_json.is_dir() else [labels_json]
    if not files:
        raise DatasetError(f"{labels_json}: no .json label files in this folder")
    frames = []
    for file in files:
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{file}: not valid JSON ({err})") from None
        if isinstance(doc, dict) and isinstance(doc.get("frames"), list):
            doc = doc["frames"]
        if not isinstance(doc, list):
            raise DatasetError(f"{file}: expected a list of frames (or {{'frames': [...]}}), got {type(doc).__name__}")
        for index, frame in enumerate(doc):
            if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
                raise DatasetError(f"{file}: frame #{index} has no 'name' string")
            if not isinstance(frame.get("labels") or [], list):
                raise DatasetError(f"{file}: frame #{index} ({frame['name']}): 'labels' must be a list")
            frames.append((str(file), index, frame))
    return frames


def _frame_image_path(images_dir: Path, frame: dict) -> Path:
    direct = images_dir / frame["name"]
    video = frame.get("videoName")
    # Tracking frames live in images/<videoName>/<name>; detection frames directly in images/.
    if video and not direct.exists():
        return images_dir / video / frame["name"]
    return direct


def _resolve_category_map(
    frames: list[tuple[str, int, dict]], classes: Sequence[str] | None, category_map: dict | None
) -> tuple[list[str], dict[str, str]]:
    if category_map is not None:
        targets = list(dict.fromkeys(v for v in category_map.values() if v is not None))
        classes = list(classes) if classes is not None else targets
        missing = [t for t in targets if t not in classes]
        if missing:
            raise DatasetError(f"category_map targets {missing} are not in classes {list(classes)}")
        return list(classes), {k: v for k, v in category_map.items() if v is not None}
    if classes is not None:
        return list(classes), category_map_for(classes)
    present = sorted({lab.get("category") for _, _, f in frames for lab in f.get("labels") or [] if "box2d" in lab})
    present = [c for c in present if isinstance(c, str)]
    return present, {c: c for c in present}


def read_bdd100k(
    labels_json: str | Path,
    images_dir: str | Path,
    classes: Sequence[str] | None = None,
    category_map: dict[str, str | None] | None = None,
    *,
    strict: bool = False,
    verify_images: bool = True,
) -> tuple[list[ImageRecord], list[str], SkipReport]:
    """Read BDD100K detection labels (``det`` JSON list or ``box_track`` per-video files).

    Parameters
    ----------
    labels_json : str or Path
        Label JSON file, or a folder of them (see :func:`load_bdd_frames`).
    images_dir : str or Path
        Folder with the frames (``<name>`` or, for tracking, ``<videoName>/<name>``).
    classes : sequence of str, optional
        Class list. Default: the targets of ``category_map``, else every category present
        (sorted).
    category_map : dict, optional
        BDD100K category -> class (``None`` drops the category). Default: each class to itself
        plus the :data:`FEDSTO_CATEGORY_MAP` aliases (see :func:`category_map_for`).
    strict : bool
        Raise on an unmapped category or a box outside the image; default False drops and counts
        them (unmapped categories are counted per category).
    verify_images : bool
        Fully decode every image (default); the size comes from the image itself.

    Returns
    -------
    records : list of ImageRecord
        ``attributes`` holds the frame's ``weather``/``timeofday``/``scene`` (when present) and
        ``videoName``/``frameIndex`` for tracking frames.
    class_names : list of str
    report : SkipReport

    Raises
    ------
    DatasetError
        See the bad input policy in :mod:`detection.datasets`.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"BDD100K image folder {images_dir} does not exist")
    frames = load_bdd_frames(labels_json)
    class_names, mapping = _resolve_category_map(frames, classes, category_map)
    class_ids = {name: i for i, name in enumerate(class_names)}
    report = SkipReport()

    unique_frames, image_paths, seen = [], [], set()
    for file, index, frame in frames:
        image = _frame_image_path(images_dir, frame).resolve()
        if image in seen:
            report.add("duplicate image entry", f"{file}: frame #{index} ({frame['name']})")
            continue
        seen.add(image)
        unique_frames.append((file, index, frame))
        image_paths.append(image)

    probes = probe_images(image_paths, verify=verify_images)
    records = []
    for (file, index, frame), image, probe in zip(unique_frames, image_paths, probes):
        if isinstance(probe, str):
            report.add(probe, image)
            continue
        where = f"{file}: frame #{index} ({frame['name']})"
        classes_, boxes = _bdd_boxes(frame, probe, mapping, class_ids, where, report, strict)
        attributes = dict(frame.get("attributes") or {})
        for key in ("videoName", "frameIndex"):
            if key in frame:
                attributes[key] = frame[key]
        records.append(ImageRecord(str(image), classes_, boxes, "default", attributes))
    return records, class_names, report


def _bdd_boxes(
    frame: dict, size: tuple[int, int], mapping: dict, class_ids: dict, where: str, report: SkipReport, strict: bool
) -> tuple[np.ndarray, np.ndarray]:
    width, height = size
    # A 1 px slack: BDD100K corners are floats and sometimes land on x2 = width + 0.5.
    tolerance = max(BOX_TOLERANCE, 1.0 / min(width, height))
    classes, boxes = [], []
    for k, label in enumerate(frame.get("labels") or []):
        at = f"{where} label #{k}"
        box2d = label.get("box2d") if isinstance(label, dict) else None
        if box2d is None:
            report.add("label without box2d", at)
            continue
        category = label.get("category")
        if category not in mapping:
            if strict:
                raise DatasetError(f"{at}: category {category!r} is not mapped to any of the classes {list(class_ids)}")
            report.add(f"unmapped category {category!r}", at)
            continue
        try:
            x1, y1, x2, y2 = (float(box2d[key]) for key in ("x1", "y1", "x2", "y2"))
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{at}: box2d must have numeric x1, y1, x2, y2, got {box2d!r}") from None
        verdict, corners = clip_or_reject_box(x1 / width, y1 / height, x2 / width, y2 / height, tolerance)
        if verdict == "outside":
            if strict:
                raise DatasetError(f"{at}: box2d {box2d} lies outside the {width}x{height} image")
            report.add("box outside image", at)
            continue
        if verdict == "empty":
            report.add("non-positive box size", at)
            continue
        if verdict == "clipped":
            report.add("box clipped to image", at)
        classes.append(class_ids[mapping[category]])
        boxes.append(xyxy_to_xywh(corners))
    classes, boxes = drop_duplicate_boxes(classes, boxes, where, report)
    return np.asarray(classes, np.int64).reshape(-1), np.asarray(boxes, np.float32).reshape(-1, 4)


def bdd_layout(source: str | Path, images_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Label JSON and image folder for a BDD100K source.

    Parameters
    ----------
    source : str or Path
        A label JSON, a folder of label JSONs, or a folder with ``labels/`` and ``images/``.
    images_dir : str or Path, optional
        Image folder; required unless ``source`` has an ``images/`` folder (or its parent does).

    Returns
    -------
    (labels, images) : tuple of Path
    """
    source = Path(source)
    if source.is_dir() and bdd_labels_in(source):
        labels, guess = source / "labels", source / "images"
    else:
        base = source.parent if source.is_file() else source
        labels, guess = source, base.parent / "images" if base.name == "labels" else base / "images"
    images = Path(images_dir) if images_dir is not None else guess
    if not images.is_dir():
        raise DatasetError(f"{source}: no BDD100K image folder at {images}; pass --bdd-images DIR")
    return labels, images
