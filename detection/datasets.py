"""Dataset readers: YOLO folders and BDD100K JSON become :class:`~detection.records.ImageRecord` lists.

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

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from detection.records import ImageRecord, SkipReport

IMAGE_SUFFIXES = frozenset({".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"})
"""Image file suffixes a reader picks up from a folder (Ultralytics' list minus exotic ones)."""

BOX_TOLERANCE = 1e-3
"""How far (in normalised units) a box may overshoot the image and still be clipped, not rejected."""

YOLO_SPLITS = ("train", "val", "test")

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


class DatasetError(ValueError):
    """Input data that cannot be read as asked; the message names the file (and line) and the fix."""


# --------------------------------------------------------------------------------------------
# Images


def probe_image(path: str | Path) -> tuple[int, int] | str:
    """Decode an image fully and return its size, or the reason it is unusable.

    Parameters
    ----------
    path : str or Path
        Image file.

    Returns
    -------
    tuple of int or str
        ``(width, height)`` for a good image, else ``"missing image"`` or ``"corrupt image"``.

    Notes
    -----
    Pillow's ``load()`` raises on a truncated JPEG, whereas ``cv2.imread`` only prints a warning
    and returns a partly grey image, so decoding with Pillow is what catches truncation.
    """
    from PIL import Image

    try:
        with pillow_open()(path) as image:
            size = image.size
            image.load()
    except FileNotFoundError:
        return "missing image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt image"
    if min(size) < 1:
        return "corrupt image"
    return size


def probe_images(paths: Sequence[str | Path], verify: bool = True) -> list[tuple[int, int] | str]:
    """:func:`probe_image` over many files, in threads (decoding releases the GIL).

    Parameters
    ----------
    paths : sequence of str or Path
        Image files.
    verify : bool
        If False only the header is read (fast, but a truncated file goes unnoticed).

    Returns
    -------
    list
        One result of :func:`probe_image` per path, in order.
    """
    probe = probe_image if verify else _probe_header
    workers = min(8, (os.cpu_count() or 1) * 2)
    if len(paths) < 16:
        return [probe(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe, paths, chunksize=32))


def pillow_open():
    """Pillow's own ``Image.open``, even after Ultralytics has wrapped it.

    Ultralytics replaces ``PIL.Image.open`` with a wrapper that, on a file Pillow cannot
    identify, tries to install ``pi-heif`` (a network call). For a reader an unidentifiable file
    is simply a corrupt image, so the original function is used.
    """
    from PIL import Image

    opener = Image.open
    module = getattr(opener, "__module__", "PIL.Image")
    if module != "PIL.Image":
        opener = getattr(sys.modules.get(module), "_image_open", opener)
    return opener


def _probe_header(path: str | Path) -> tuple[int, int] | str:
    try:
        with pillow_open()(path) as image:
            return image.size
    except FileNotFoundError:
        return "missing image"
    except (OSError, SyntaxError, ValueError):
        return "corrupt image"


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


def _drop_duplicate_boxes(classes: list[int], boxes: list[tuple], where: str, report: SkipReport) -> tuple[list, list]:
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
# YOLO


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
    classes, boxes = _drop_duplicate_boxes(classes, boxes, str(label_file), report)
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


def _find_yaml(folder: Path) -> Path | None:
    for name in ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml"):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    return candidates[0] if len(candidates) == 1 else None


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
        See the module's bad input policy.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if domain_from not in (None, "folder"):
        raise DatasetError(f"domain_from must be None or 'folder', got {domain_from!r}")
    report = SkipReport()
    yaml_file = path if path.is_file() else _find_yaml(path)
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


# --------------------------------------------------------------------------------------------
# BDD100K


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
        See the module's bad input policy.
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
    classes, boxes = _drop_duplicate_boxes(classes, boxes, where, report)
    return np.asarray(classes, np.int64).reshape(-1), np.asarray(boxes, np.float32).reshape(-1, 4)


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
    elif _find_yaml(source) is not None or ((source / "images").is_dir() and not _bdd_labels_in(source)):
        return "yolo"
    elif _bdd_labels_in(source) or any(source.glob("*.json")):
        return "bdd100k"
    raise DatasetError(
        f"{source}: neither a YOLO dataset (data.yaml or images/+labels/) nor BDD100K labels (.json); pass --format"
    )


def _bdd_labels_in(folder: Path) -> bool:
    return (folder / "labels").is_dir() and any((folder / "labels").glob("*.json"))


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
    if source.is_dir() and _bdd_labels_in(source):
        labels, guess = source / "labels", source / "images"
    else:
        base = source.parent if source.is_file() else source
        labels, guess = source, base.parent / "images" if base.name == "labels" else base / "images"
    images = Path(images_dir) if images_dir is not None else guess
    if not images.is_dir():
        raise DatasetError(f"{source}: no BDD100K image folder at {images}; pass --bdd-images DIR")
    return labels, images
