"""Pseudo labels from the teacher: threshold split, quality diagnostics, and the loss that uses them.

Ultralytics' v5u/v8/11 heads are anchor-free with no objectness branch, so the paper's
(YOLOv5) recipe is mapped as follows, and kept configurable:

* teacher score >= ``tau_high``: *reliable*, a hard target (class and box losses);
* ``tau_low`` <= score < ``tau_high``: *uncertain*; the anchors the assigner gives such a box get
  - ``soft`` (default): a class target equal to the teacher's score, and no box loss;
  - ``ignore``: no class-loss gradient (target set to the student's own detached probability,
    where the BCE gradient is zero) and no box loss;
  - ``drop``: the box is removed before assignment, so its anchors count as background;
* score < ``tau_low``: background (NMS already drops boxes under ``nms_conf``).

The loss is Ultralytics' ``v8DetectionLoss`` with its task-aligned assigner wrapped: the wrapper
rewrites the targets of anchors assigned to uncertain boxes. Nothing else of the loss is forked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import detection  # noqa: F401
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.metrics import box_iou
from ultralytics.utils.ops import xywh2xyxy, xyxy2xywh

PSEUDO_MODES = ("soft", "ignore", "drop")


@dataclass
class PseudoLabelSplit:
    """Teacher detections of one image, split into bands; boxes normalised ``xywh``."""

    reliable_classes: np.ndarray
    reliable_boxes: np.ndarray
    reliable_scores: np.ndarray
    uncertain_classes: np.ndarray
    uncertain_boxes: np.ndarray
    uncertain_scores: np.ndarray

    @property
    def num_reliable(self) -> int:
        return len(self.reliable_classes)

    @property
    def num_uncertain(self) -> int:
        return len(self.uncertain_classes)


def split_pseudo_labels(detections: np.ndarray, imgsz: int, tau_low: float = 0.1, tau_high: float = 0.6) -> PseudoLabelSplit:
    """Split NMS output rows ``x1, y1, x2, y2, score, cls`` (pixels) at ``tau_low``/``tau_high``."""
    if not 0.0 <= tau_low <= tau_high <= 1.0:
        raise ValueError(f"need 0 <= tau_low ({tau_low}) <= tau_high ({tau_high}) <= 1")
    det = np.asarray(detections, np.float32).reshape(-1, 6)
    boxes = xyxy2xywh(np.clip(det[:, :4], 0, imgsz)) / imgsz if len(det) else np.zeros((0, 4), np.float32)
    keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    det, boxes = det[keep], boxes[keep]
    score, cls = det[:, 4], det[:, 5].astype(np.int64)
    hi = score >= tau_high
    mid = (score >= tau_low) & ~hi
    return PseudoLabelSplit(cls[hi], boxes[hi].astype(np.float32), score[hi],
                            cls[mid], boxes[mid].astype(np.float32), score[mid])


def match_counts(boxes: np.ndarray, classes: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray,
                 iou_threshold: float = 0.5) -> int:
    """Number of pseudo boxes (normalised ``xywh``) that match a distinct same-class true box at IoU >= 0.5.

    Greedy one-to-one matching, highest IoU first: precision = matches / pseudo boxes, recall =
    matches / true boxes.
    """
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return 0
    iou = box_iou(torch.as_tensor(xywh2xyxy(np.asarray(gt_boxes, np.float32))),
                  torch.as_tensor(xywh2xyxy(np.asarray(boxes, np.float32)))).numpy()
    iou = iou * (np.asarray(gt_classes)[:, None] == np.asarray(classes)[None, :])
    matches = 0
    for _ in range(min(iou.shape)):
        g, p = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[g, p] < iou_threshold:
            break
        matches += 1
        iou[g, :] = 0
        iou[:, p] = 0
    return matches


def count_pseudo_boxes(split: PseudoLabelSplit, gt_classes: np.ndarray | None = None,
                       gt_boxes: np.ndarray | None = None) -> dict[str, float]:
    """One image's pseudo-box counts, to be summed over images (see :func:`pseudo_box_quality`).

    ``pseudo_reliable`` / ``pseudo_uncertain`` count the boxes of each band; with the image's true
    boxes (hidden labels: diagnostics only) ``true_boxes`` and the matches of each band
    (``matched_reliable`` / ``matched_uncertain``, see :func:`match_counts`) are counted too.
    """
    counts = {"pseudo_reliable": float(split.num_reliable), "pseudo_uncertain": float(split.num_uncertain)}
    if gt_classes is not None:
        counts["true_boxes"] = float(len(gt_classes))
        counts["matched_reliable"] = float(match_counts(split.reliable_boxes, split.reliable_classes, gt_boxes, gt_classes))
        counts["matched_uncertain"] = float(match_counts(split.uncertain_boxes, split.uncertain_classes, gt_boxes, gt_classes))
    return counts


def pseudo_box_quality(sums: dict[str, float]) -> dict[str, float]:
    """Precision and recall of each band from summed :func:`count_pseudo_boxes` (empty without true boxes)."""
    if "true_boxes" not in sums:
        return {}
    out = {}
    for band in ("reliable", "uncertain"):
        pred, matched, true = sums.get(f"pseudo_{band}", 0.0), sums.get(f"matched_{band}", 0.0), sums["true_boxes"]
        out[f"pseudo_{band}_precision"] = matched / pred if pred else 0.0
        out[f"pseudo_{band}_recall"] = matched / true if true else 0.0
    return out


def pad_per_image(values: torch.Tensor, batch_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-box values laid out ``(batch, max_boxes)`` exactly as ``v8DetectionLoss.preprocess`` lays out boxes."""
    if len(values) == 0:
        return torch.zeros(batch_size, 0, dtype=values.dtype, device=values.device)
    idx = batch_idx.long()
    counts = torch.bincount(idx, minlength=batch_size)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    within = torch.arange(len(idx), device=idx.device) - offsets[idx]
    out = torch.zeros(batch_size, int(counts.max()), dtype=values.dtype, device=values.device)
    out[idx, within] = values
    return out


class UncertainBoxAssigner(torch.nn.Module):
    """Wraps Ultralytics' ``TaskAlignedAssigner``; rewrites targets of anchors assigned to uncertain boxes.

    ``scores`` and ``uncertain`` are ``(batch, max_boxes)`` tensors set before each loss call.
    """

    def __init__(self, inner: torch.nn.Module, mode: str):
        super().__init__()
        if mode not in PSEUDO_MODES:
            raise ValueError(f"pseudo-label mode {mode!r}: expected one of {PSEUDO_MODES}")
        self.inner, self.mode = inner, mode
        self.scores: torch.Tensor | None = None
        self.uncertain: torch.Tensor | None = None

    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra):
        labels, bboxes, target_scores, fg_mask, gt_idx = self.inner(pd_scores, pd_bboxes, anc_points, gt_labels,
                                                                    gt_bboxes, mask_gt, **extra)
        if self.uncertain is None or self.uncertain.shape[1] == 0 or not bool(self.uncertain.any()):
            return labels, bboxes, target_scores, fg_mask, gt_idx
        gt_idx = gt_idx.long()
        on_uncertain = fg_mask & self.uncertain.gather(1, gt_idx)  # (batch, anchors)
        target_scores = target_scores.clone()
        if self.mode == "soft":
            cls = labels[on_uncertain].long().clamp(0, target_scores.shape[-1] - 1)
            onehot = torch.nn.functional.one_hot(cls, target_scores.shape[-1]).to(target_scores.dtype)
            teacher = self.scores.gather(1, gt_idx)[on_uncertain].to(target_scores.dtype)
            target_scores[on_uncertain] = onehot * teacher[:, None]
        else:  # ignore: BCE(x, sigmoid(x)) has zero gradient in x
            target_scores[on_uncertain] = pd_scores[on_uncertain].to(target_scores.dtype)
        fg_mask = fg_mask & ~on_uncertain  # no box loss for uncertain boxes
        return labels, bboxes, target_scores, fg_mask, gt_idx


class PseudoLabelLoss(v8DetectionLoss):
    """Ultralytics' detection loss with reliable/uncertain pseudo boxes.

    The batch carries, per box, ``pl_scores`` (teacher score) and ``pl_uncertain`` (bool). Boxes
    of ``drop`` mode never reach the loss (the caller leaves them out), so in that mode this is the
    plain Ultralytics loss.
    """

    def __init__(self, model: torch.nn.Module, mode: str = "soft", tal_topk: int = 10):
        super().__init__(model, tal_topk=tal_topk)
        self.mode = mode
        # Kept apart from ``self.assigner``, which a loss hook may wrap (detection.loss_hooks).
        self.uncertain_assigner = UncertainBoxAssigner(self.assigner, mode)
        self.assigner = self.uncertain_assigner

    def loss(self, preds, batch):
        batch_size = preds["boxes"].shape[0]
        if "pl_uncertain" in batch and self.mode != "drop":
            self.uncertain_assigner.scores = pad_per_image(batch["pl_scores"].float(), batch["batch_idx"], batch_size).to(self.device)
            self.uncertain_assigner.uncertain = pad_per_image(batch["pl_uncertain"].bool(), batch["batch_idx"], batch_size).to(self.device)
        else:
            self.uncertain_assigner.scores = self.uncertain_assigner.uncertain = None
        try:
            return super().loss(preds, batch)
        finally:
            self.uncertain_assigner.scores = self.uncertain_assigner.uncertain = None
