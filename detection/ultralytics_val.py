"""Cross-check of our mAP: score a saved model with Ultralytics' own ``YOLO(model).val()``.

A user who doubts our numbers runs ``val()`` on the test images; this module does exactly that for
a list of records, so tests and benchmarks can put both numbers side by side. The records are
written as a YOLO dataset (symbolic links to the images, label files beside them) in a folder of
the caller's, and ``val()`` runs with every argument that changes a metric at its default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import detection  # noqa: F401  (offline Ultralytics settings first)
from detection.records import ImageRecord


def write_yolo_split(records: Sequence[ImageRecord], out_dir: str | Path, class_names: Sequence[str]) -> Path:
    """Write ``records`` as a YOLO dataset under ``out_dir``; returns its ``data.yaml``.

    Images are linked, not copied (the i-th record becomes ``images/<i>_<name>``, so names from
    different folders never collide); labels are the records' own boxes.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        source = Path(record.path)
        name = f"{i:06d}_{source.stem}"
        link = out / "images" / f"{name}{source.suffix}"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(source.resolve(), link)
        rows = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, (x, y, w, h) in zip(record.classes, record.boxes)]
        (out / "labels" / f"{name}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(class_names))
    data = out / "data.yaml"
    data.write_text(f"path: {out.resolve()}\ntrain: images\nval: images\nnames:\n{names}\n")
    return data


def ultralytics_val(model_path: str | Path, data_yaml: str | Path, imgsz: int, work_dir: str | Path) -> dict[str, float]:
    """``YOLO(model_path).val(data=data_yaml, imgsz=imgsz)``: mAP50 and mAP50-95.

    Only where the run's files go and the chatter differ from the defaults (``project``, ``name``,
    ``plots``, ``verbose``); batch, rect, padding, confidence, IoU and max_det are ``val()``'s own.
    """
    from ultralytics import YOLO

    metrics = YOLO(str(model_path)).val(data=str(data_yaml), imgsz=imgsz, project=str(work_dir), name="val",
                                        exist_ok=True, plots=False, verbose=False)
    return {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map)}
