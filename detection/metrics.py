"""mAP50 and mAP50-95 per domain, from Ultralytics' own matching and AP code.

Predictions and ground truth are compared in the letterboxed frame: letterboxing is a uniform
scale plus a shift, which leaves IoU unchanged, so no mapping back to the original image is needed.
Evaluation reproduces Ultralytics' ``val()`` at its defaults: the same resize and canvas
(bilinear, rectangular, half a stride of padding, :func:`detection.images.evaluation_cache`), the
same NMS (conf 0.001, IoU 0.7, 300 boxes, several labels per box) and the same AP code, so
``YOLO(model.pt).val(imgsz=...)`` reports the same mAP50 per domain (``tests/test_ultralytics_val.py``).
``Total`` is the unweighted mean over domains, the server's domain included (as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import detection  # noqa: F401
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import ap_per_class, box_iou
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import xywh2xyxy

from detection.images import VAL_RECT_PAD, LetterboxCache, evaluation_cache, to_model_batch
from detection.records import ImageRecord

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


@dataclass
class NmsConfig:
    """Post-processing of raw head outputs (defaults: Ultralytics' validation).

    ``multi_label`` keeps every class above ``conf`` for a box, as ``val()`` does; pseudo labels
    use one class per box (False).
    """

    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    multi_label: bool = True


class _Matcher:
    """Just enough of a validator to call ``BaseValidator.match_predictions`` directly."""

    iouv = IOU_THRESHOLDS


def match_image(pred: np.ndarray, gt_classes: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """Boolean ``(n_pred, 10)`` matrix: is each prediction a true positive at IoU 0.50:0.95?

    ``pred`` rows are ``x1, y1, x2, y2, conf, cls`` sorted by descending confidence (NMS output).
    """
    if len(pred) == 0:
        return np.zeros((0, len(IOU_THRESHOLDS)), bool)
    if len(gt_classes) == 0:
        return np.zeros((len(pred), len(IOU_THRESHOLDS)), bool)
    iou = box_iou(torch.as_tensor(gt_xyxy, dtype=torch.float32), torch.as_tensor(pred[:, :4], dtype=torch.float32))
    correct = BaseValidator.match_predictions(_Matcher(), torch.as_tensor(pred[:, 5]), torch.as_tensor(gt_classes, dtype=torch.float32), iou)
    return correct.numpy()


@dataclass
class DetectionStats:
    """Per-prediction match results accumulated over a test split."""

    tp: list = field(default_factory=list)
    conf: list = field(default_factory=list)
    pred_cls: list = field(default_factory=list)
    target_cls: list = field(default_factory=list)

    def add(self, pred: np.ndarray, gt_classes: np.ndarray, gt_xyxy: np.ndarray) -> None:
        self.tp.append(match_image(pred, gt_classes, gt_xyxy))
        self.conf.append(pred[:, 4])
        self.pred_cls.append(pred[:, 5])
        self.target_cls.append(np.asarray(gt_classes, np.float64))

    def compute(self) -> dict[str, float]:
        """``map50``, ``map50_95``, ``precision``, ``recall`` (Ultralytics' definitions)."""
        target_cls = np.concatenate(self.target_cls) if self.target_cls else np.zeros(0)
        tp = np.concatenate(self.tp) if self.tp else np.zeros((0, 10), bool)
        if len(target_cls) == 0 or len(tp) == 0:
            return {"map50": 0.0, "map50_95": 0.0, "precision": 0.0, "recall": 0.0, "targets": int(len(target_cls))}
        _, _, p, r, _, ap, *_ = ap_per_class(tp, np.concatenate(self.conf), np.concatenate(self.pred_cls), target_cls)
        return {"map50": float(ap[:, 0].mean()), "map50_95": float(ap.mean()), "precision": float(p.mean()),
                "recall": float(r.mean()), "targets": int(len(target_cls))}


def postprocess(raw: torch.Tensor, nms: NmsConfig) -> list[np.ndarray]:
    """Ultralytics NMS on raw eval-mode outputs; rows ``x1, y1, x2, y2, conf, cls`` per image."""
    # A generous time limit: a truncated NMS would make results depend on machine speed.
    out = non_max_suppression(raw, nms.conf, nms.iou, max_det=nms.max_det, multi_label=nms.multi_label,
                              max_time_img=10.0)
    return [o.detach().cpu().numpy().astype(np.float64) for o in out]


@torch.no_grad()
def predict_records(model: torch.nn.Module, records: Sequence[ImageRecord], imgsz: int, batch_size: int = 32,
                    nms: NmsConfig | None = None, cache: LetterboxCache | None = None,
                    device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Detections (letterboxed pixel ``xyxy``, conf, cls) for each record, in order.

    Consecutive records on canvases of one shape share a batch (``cache`` decides the canvas).
    """
    nms = nms or NmsConfig()
    cache = evaluation_cache(imgsz) if cache is None else cache
    was_training = model.training
    model.eval()
    preds: list[np.ndarray] = []
    try:
        start = 0
        while start < len(records):
            shape = cache.canvas(records[start].path)
            end = start + 1
            while end < min(len(records), start + batch_size) and cache.canvas(records[end].path) == shape:
                end += 1
            batch = to_model_batch([cache.get(r.path) for r in records[start:end]], device=device)
            raw = model(batch["img"])
            preds.extend(postprocess(raw[0] if isinstance(raw, (tuple, list)) else raw, nms))
            start = end
    finally:
        model.train(was_training)
    return preds


def gt_xyxy_pixels(record: ImageRecord, cache: LetterboxCache) -> np.ndarray:
    """Ground-truth boxes of a record as letterboxed pixel ``xyxy``."""
    boxes = cache.boxes(record.path, record.boxes)
    h, w = cache.canvas(record.path)
    return xywh2xyxy(boxes * np.array([w, h, w, h], np.float32)) if len(boxes) else np.zeros((0, 4), np.float32)


def evaluate_records(model: torch.nn.Module, records: Sequence[ImageRecord], imgsz: int, batch_size: int = 32,
                     nms: NmsConfig | None = None, cache: LetterboxCache | None = None,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """mAP50 / mAP50-95 of a model on labelled records, as Ultralytics' ``val()`` computes them."""
    cache = evaluation_cache(imgsz) if cache is None else cache
    if cache.rect_pad != VAL_RECT_PAD:
        raise ValueError("evaluate_records: the cache must be an evaluation_cache (Ultralytics' validation canvas)")
    preds = predict_records(model, records, imgsz, batch_size, nms, cache, device)
    stats = DetectionStats()
    for record, pred in zip(records, preds):
        stats.add(pred, record.classes, gt_xyxy_pixels(record, cache))
    result = stats.compute()
    result["images"] = len(records)
    return result


def evaluate_domains(model: torch.nn.Module, records_by_domain: Mapping[str, Sequence[ImageRecord]], imgsz: int,
                     batch_size: int = 32, nms: NmsConfig | None = None, device: str | torch.device = "cpu",
                     caches: dict[str, LetterboxCache] | None = None) -> dict[str, dict[str, float]]:
    """Per-domain metrics plus ``Total``: the unweighted mean of each metric over the domains."""
    results: dict[str, dict[str, float]] = {}
    for domain, records in records_by_domain.items():
        cache = caches.setdefault(domain, evaluation_cache(imgsz)) if caches is not None else None
        results[domain] = evaluate_records(model, records, imgsz, batch_size, nms, cache, device)
    results["Total"] = total_row(results)
    return results


def total_row(per_domain: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over domains of mAP50 and mAP50-95 (the paper's ``Total``)."""
    rows = [v for k, v in per_domain.items() if k != "Total"]
    return {key: float(np.mean([r[key] for r in rows])) if rows else 0.0 for key in ("map50", "map50_95")}
