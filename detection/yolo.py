"""The YOLO reader: a ``data.yaml`` or an ``images/`` folder with its parallel ``labels/`` tree.

:func:`read_yolo_dataset` returns ``(records, class_names, report)``; what happens to each kind of
bad input is the policy in :mod:`detection.datasets`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import yaml

from detection.datasets import (
    BOX_TOLERANCE,
    DatasetError,
    clip_or_reject_box,
    drop_duplicate_boxes,
    find_yaml,
    xyxy_to_xywh,
)
from detection.probe import IMAGE_SUFFIXES, probe_images
from detection.records import ImageRecord, SkipReport

YOLO_SPLITS = ("train", "val", "test")


def label_path_for(image_path: str | Path) -> Path:
    """Ultralytics' convention: replace the last ``/images/`` with ``/labels/``, suffix ``.txt``.

    Parameters
    ----------
    image_path : str or Path
        Image file.

    Returns
    -------
    Path
        Where its YOLO label file is expected.
    """
    text = str(image_path)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images in text:
        text = labels.join(text.rsplit(images, 1))
    return Path(text).with_suffix(".txt")


def parse_yolo_label_file(
    label_file: str | Path, num_classes: int, report: SkipReport, strict: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read one YOLO label file (rows ``class x y w h`` or polygons ``class x1 y1 x2 y2 ...``).

    Parameters
    ----------
    label_file : str or Path
        The ``.txt`` file; it must exist.
    num_classes : int
        Valid class ids are ``0 .. num_classes - 1``.
    report : SkipReport
        Receives the dropped/clipped/converted boxes (and ``empty label file``).
    strict : bool
        Raise on out-of-range class ids and boxes outside the image (else drop and count).

    Returns
    -------
    classes : np.ndarray
        ``(N,)`` int64.
    boxes : np.ndarray
        ``(N, 4)`` float32 normalised ``xywh``.

    Raises
    ------
    DatasetError
        On a malformed line, or (``strict``) a bad class id or box; the message names
        ``file:line``.
    """
    text = Path(label_file).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        report.add("empty label file", label_file)
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    classes: list[int] = []
    boxes: list[tuple] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{label_file}:{lineno}"
        fields = line.split()
        if not fields:
            continue
        parsed = _parse_yolo_line(fields, line, where, num_classes, report, strict)
        if parsed is not None:
            classes.append(parsed[0])
            boxes.append(parsed[1])
    classes, boxes = drop_duplicate_boxes(classes, boxes, str(label_file), report)
    return np.asarray(classes, np.int64).reshape(-1), np.asarray(boxes, np.float32).reshape(-1, 4)


def _parse_yolo_line(
    fields: list[str], line: str, where: str, num_classes: int, report: SkipReport, strict: bool
) -> tuple[int, tuple] | None:
    is_box = len(fields) == 5
    is_polygon = len(fields) >= 7 and len(fields) % 2 == 1
    if not (is_box or is_polygon):
        raise DatasetError(
            f"{where}: expected 5 fields 'class x y w h' (or a polygon 'class x1 y1 x2 y2 x3 y3 ...'), "
            f"got {len(fields)}: {line.strip()!r}"
        )
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise DatasetError(f"{where}: not a number in {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise DatasetError(f"{where}: NaN or infinite value in {line.strip()!r}")
    cls = values[0]
    if cls != int(cls):
        raise DatasetError(f"{where}: class id must be an integer, got {fields[0]!r} in {line.strip()!r}")
    cls = int(cls)
    if not 0 <= cls < num_classes:
        if strict:
            raise DatasetError(
                f"{where}: class id {cls} out of range 0..{num_classes - 1} ({num_classes} class names); "
                "fix the label or the names list (strict=False drops such boxes)"
            )
        report.add("class id out of range", where)
        return None
    if is_box:
        x, y, w, h = values[1:]
        corners = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
    else:
        xs, ys = values[1::2], values[2::2]
        corners = (min(xs), min(ys), max(xs), max(ys))
        report.add("polygon converted to box", where)
    verdict, corners = clip_or_reject_box(*corners)
    if verdict == "outside":
        if strict:
            raise DatasetError(
                f"{where}: box {line.strip()!r} lies outside the image by more than {BOX_TOLERANCE} "
                "(YOLO boxes are normalised to [0, 1]; strict=False drops such boxes)"
            )
        report.add("box outside image", where)
        return None
    if verdict == "empty":
        report.add("non-positive box size", where)
        return None
    if verdict == "clipped":
        report.add("box clipped to image", where)
    return cls, xyxy_to_xywh(corners)


def load_yolo_yaml(yaml_file: str | Path) -> tuple[Path, dict[str, list[Path]], list[str]]:
    """Read a YOLO ``data.yaml``.

    Parameters
    ----------
    yaml_file : str or Path
        The yaml file.

    Returns
    -------
    root : Path
        Dataset root (``path`` key resolved against the yaml's folder; the folder itself if absent).
    splits : dict
        ``{"train"|"val"|"test": [image dir or list file, ...]}`` for the splits present.
    class_names : list of str

    Raises
    ------
    DatasetError
        If the yaml is unreadable, has no ``names``, or ``names``/``nc`` disagree.
    """
    yaml_file = Path(yaml_file)
    try:
        data = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DatasetError(f"{yaml_file}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{yaml_file}: expected a mapping with keys path/train/val/test/names")
    class_names = _class_names_from_yaml(data.get("names"), yaml_file)
    if "nc" in data and int(data["nc"]) != len(class_names):
        raise DatasetError(f"{yaml_file}: nc={data['nc']} but {len(class_names)} names")
    root = Path(data.get("path") or ".")
    if not root.is_absolute():
        root = yaml_file.parent / root
    root = root.resolve()
    splits: dict[str, list[Path]] = {}
    for split in YOLO_SPLITS:
        entries = data.get(split)
        if entries is None:
            continue
        entries = entries if isinstance(entries, list) else [entries]
        splits[split] = [_resolve_split_entry(root, str(e)) for e in entries]
    if not splits:
        raise DatasetError(f"{yaml_file}: none of the keys {', '.join(YOLO_SPLITS)} is set")
    return root, splits, class_names


def _class_names_from_yaml(names, yaml_file: Path) -> list[str]:
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_file}: 'names' keys must be integer class ids, got {list(names)[:5]}") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"{yaml_file}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids[:10]}")
        by_id = {int(k): str(v) for k, v in names.items()}
        return [by_id[i] for i in ids]
    raise DatasetError(f"{yaml_file}: 'names' must be a list or a mapping id -> name, got {type(names).__name__}")


def _resolve_split_entry(root: Path, entry: str) -> Path:
    path = Path(entry)
    if path.is_absolute():
        return path
    resolved = (root / path).resolve()
    # Roboflow exports write "../train/images" meaning "<root>/train/images"; Ultralytics accepts it.
    if not resolved.exists() and entry.startswith("../"):
        resolved = (root / entry[3:]).resolve()
    return resolved


def list_split_images(entry: Path, report: SkipReport) -> list[tuple[Path, Path]]:
    """Images of one split entry: a folder (searched recursively) or a ``.txt`` list of paths.

    Parameters
    ----------
    entry : Path
        Image folder or list file.
    report : SkipReport
        Receives ``non-image file ignored``.

    Returns
    -------
    list of (image path, base folder)
        The base folder is what a ``domain_from="folder"`` domain is relative to.

    Raises
    ------
    DatasetError
        If the entry does not exist.
    """
    if entry.is_file() and entry.suffix == ".txt":
        images = []
        for line in entry.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                path = Path(line)
                images.append(((path if path.is_absolute() else entry.parent / path).resolve(), entry.parent))
        return images
    if not entry.is_dir():
        raise DatasetError(f"image folder or list file {entry} does not exist")
    images = []
    for path in sorted(entry.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append((path.resolve(), entry.resolve()))
        elif not path.name.startswith("."):
            report.add("non-image file ignored", path)
    return images


def read_yolo_dataset(
    path: str | Path,
    *,
    splits: Iterable[str] | None = None,
    domain_from: str | None = None,
    domain: str = "default",
    class_names: Sequence[str] | None = None,
    strict: bool = True,
    verify_images: bool = True,
) -> tuple[list[ImageRecord], list[str], SkipReport]:
    """Read a YOLO-format dataset.

    Parameters
    ----------
    path : str or Path
        A ``data.yaml`` (keys ``path``, ``train``/``val``/``test`` as folders, list files or lists
        of them, ``names`` as list or mapping), a folder containing one, or a folder with an
        ``images/`` subfolder (class names then from ``class_names`` or ``classes.txt``). Labels
        live in the parallel ``labels/`` tree (see :func:`label_path_for`).
    splits : iterable of str, optional
        Which of ``train``, ``val``, ``test`` to read; default all that the yaml names.
    domain_from : {None, "folder"}
        ``"folder"``: the domain of an image is the first folder below its split's image folder
        (``images/<domain>/...``); an image directly in the image folder is an error.
        ``None``: every record gets ``domain``.
    domain : str
        Domain for all records when ``domain_from`` is None.
    class_names : sequence of str, optional
        Class names for a folder without a yaml (overrides ``classes.txt``).
    strict : bool
        Raise on out-of-range class ids and boxes outside the image (default); if False they are
        dropped and counted.
    verify_images : bool
        Fully decode every image (default) so corrupt and truncated files are caught.

    Returns
    -------
    records : list of ImageRecord
        In a deterministic order (split, then path); ``attributes["split"]`` holds the split.
    class_names : list of str
    report : SkipReport

    Raises
    ------
    DatasetError
        See the bad input policy in :mod:`detection.datasets`.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if domain_from not in (None, "folder"):
        raise DatasetError(f"domain_from must be None or 'folder', got {domain_from!r}")
    report = SkipReport()
    yaml_file = path if path.is_file() else find_yaml(path)
    if yaml_file is not None:
        _, split_entries, names = load_yolo_yaml(yaml_file)
    else:
        split_entries, names = _folder_layout(path, class_names)
    if class_names is not None:
        names = list(class_names)
    wanted = list(splits) if splits is not None else list(split_entries)
    unknown = [s for s in wanted if s not in split_entries]
    if unknown:
        raise DatasetError(f"{yaml_file or path}: split(s) {unknown} not defined; available: {list(split_entries)}")

    listed: list[tuple[Path, str, str]] = []  # (image, split, domain)
    seen: set[Path] = set()
    read_entries: dict[Path, str] = {}
    for split in wanted:
        for entry in split_entries[split]:
            # Ultralytics yamls often reuse the train folder as val; read it once, say so once.
            if entry in read_entries:
                report.add("split reuses another split's images", f"{split}: {entry} (read as {read_entries[entry]})")
                continue
            read_entries[entry] = split
            for image, base in list_split_images(entry, report):
                if image in seen:
                    report.add("duplicate image entry", image)
                    continue
                seen.add(image)
                listed.append((image, split, _image_domain(image, base, domain_from, domain)))

    probes = probe_images([p for p, _, _ in listed], verify=verify_images)
    records = []
    for (image, split, image_domain), probe in zip(listed, probes):
        if isinstance(probe, str):
            report.add(probe, image)
            continue
        label_file = label_path_for(image)
        if label_file.is_file():
            classes, boxes = parse_yolo_label_file(label_file, len(names), report, strict=strict)
        else:
            report.add("missing label file", label_file)
            classes, boxes = np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
        records.append(ImageRecord(str(image), classes, boxes, image_domain, {"split": split}))
    return records, names, report


def _folder_layout(folder: Path, class_names: Sequence[str] | None) -> tuple[dict[str, list[Path]], list[str]]:
    images = folder / "images"
    if not images.is_dir():
        raise DatasetError(f"{folder}: no data.yaml and no images/ folder; expected a YOLO dataset")
    if class_names is not None:
        names = list(class_names)
    elif (folder / "classes.txt").is_file():
        names = [n.strip() for n in (folder / "classes.txt").read_text(encoding="utf-8").splitlines() if n.strip()]
    else:
        raise DatasetError(f"{folder}: no data.yaml and no classes.txt; pass the class names")
    return {"train": [images]}, names


def _image_domain(image: Path, base: Path, domain_from: str | None, default: str) -> str:
    if domain_from is None:
        return default
    try:
        parts = image.relative_to(base).parts
    except ValueError:
        parts = ()
    if len(parts) < 2:
        raise DatasetError(
            f"{image}: domain_from='folder' needs images/<domain>/<file>, but the image lies directly in {base}"
        )
    return parts[0]
