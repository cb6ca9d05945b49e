"""Local training on unlabelled images with pseudo labels from a local EMA teacher (a FedSTO client's round).

Per step: the teacher (an EMA of the student, reset from the model's weights at the start of the
call) predicts on the weak view; NMS and the ``tau_low``/``tau_high`` split give reliable and
uncertain pseudo boxes; the student trains on the strong view of the same images with
:class:`~detection.pseudo_labels.PseudoLabelLoss`; then the teacher takes one EMA step. True
labels, when given (simulation), are used only to measure pseudo-label precision and recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from detection.ema import EmaTeacher, resolve_ema_decay
from detection.images import LetterboxCache, to_model_batch
from detection.loss_hooks import LossHook
from detection.metrics import NmsConfig, postprocess
from detection.pseudo_labels import PSEUDO_MODES, PseudoLabelLoss, count_pseudo_boxes, pseudo_box_quality, split_pseudo_labels
from detection.records import ImageRecord
from detection.seeds import derive_seed
from detection.train import TrainConfig, TrainStats, augment_view, batches_per_epoch, labelled_views, run_steps
from detection.views import apply_view, strong_view, weak_view


EMA_UPDATES = ("step", "round")

@dataclass
class SemiConfig:
    """Settings of one semi-supervised local training call.

    Parameters
    ----------
    train : TrainConfig
        Loop settings (steps, optimiser, trainable groups, image size, seed).
    ema_decay : float or str
        Teacher decay per optimiser step (paper: 0.999) or ``"auto"`` (half-life = a quarter of the call's steps).
    ema_ramp : bool
        Mean-teacher warm start of the decay.
    tau_low, tau_high : float
        Pseudo-label band thresholds (paper: 0.1, 0.6).
    nms_conf, nms_iou : float
        Teacher NMS settings (paper: 0.1, 0.65).
    pseudo_mode : str
        ``soft``, ``ignore`` or ``drop`` (see :mod:`detection.pseudo_labels`).
    min_reliable_boxes : int
        Images with fewer reliable pseudo boxes are left out of the step (counted), so a weak teacher
        does not teach "background" wholesale. 0 keeps every image.
    ema_update : str
        ``step``: the teacher follows the student after every optimiser step (the paper's local
        EMA); ``round``: it stays the model the round started from. A client's teacher restarts
        from the broadcast every round, so an EMA updated once per round is exactly that fixed teacher.
    labelled_augment : str
        View of the labelled images mixed into each step when ``train_unlabelled`` gets
        ``labelled`` records (centralised semi-supervised training; a FedSTO client has none).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    ema_decay: float | str = "auto"
    ema_ramp: bool = False
    tau_low: float = 0.1
    tau_high: float = 0.6
    nms_conf: float = 0.1
    nms_iou: float = 0.65
    pseudo_mode: str = "soft"
    min_reliable_boxes: int = 0
    labelled_augment: str = "strong"
    ema_update: str = "step"

    def __post_init__(self) -> None:
        if self.ema_update not in EMA_UPDATES:
            raise ValueError(f"ema update {self.ema_update!r}: expected one of {EMA_UPDATES}")
        if self.pseudo_mode not in PSEUDO_MODES:
            raise ValueError(f"pseudo-label mode {self.pseudo_mode!r}: expected one of {PSEUDO_MODES}")


def train_unlabelled(model: torch.nn.Module, image_paths: Sequence[str], cfg: SemiConfig, *,
                     regulariser: Callable[[], torch.Tensor] | None = None,
                     hidden_records: Sequence[ImageRecord] | None = None, seed_parts: Iterable[int] = (),
                     cache: LetterboxCache | None = None, teacher: EmaTeacher | None = None,
                     labelled: Sequence[ImageRecord] = (), loss_hook: LossHook | None = None) -> TrainStats:
    """Train ``model`` in place on unlabelled images with local-EMA-teacher pseudo labels.

    Parameters
    ----------
    model : DetectionModel
        The student, trained in place (its trainable groups per ``cfg.train.trainable``).
    image_paths : sequence of str
        The node's unlabelled images.
    cfg : SemiConfig
        Pseudo-label and loop settings.
    regulariser : callable, optional
        Differentiable scalar added to the loss (FedSTO phase 2: orthogonality on neck and head).
    hidden_records : sequence of ImageRecord, optional
        True labels of the same images, in the same order, for diagnostics only (precision/recall).
    seed_parts : iterable of int
        (round, partition, ...) so every round and node draws its own shuffles and views.
    cache : LetterboxCache, optional
        Letterboxed images, reusable across calls.
    teacher : EmaTeacher, optional
        A teacher to reuse; it is reset from the model's current weights (a fresh one otherwise).
    labelled : sequence of ImageRecord, optional
        Labelled images; each step then adds ``batch_size`` of them (true boxes as reliable boxes of
        score 1) to the pseudo-labelled ones, so one loss sums the supervised and the pseudo-label
        terms (Unbiased-Teacher-style centralised training). Empty for a federated client.
    loss_hook : LossHook, optional
        A strategy's local term (FedProx's proximal term, FRAug); it sees the reliable pseudo boxes
        as the assigner's positives.

    Returns
    -------
    TrainStats
        ``extra`` holds ``pseudo_reliable``, ``pseudo_uncertain`` (box counts), ``pseudo_images``
        (images used), ``images_skipped``, ``steps_skipped``, ``ema_decay``, and with hidden
        labels ``pseudo_{reliable,uncertain}_{precision,recall}``.
    """
    if not image_paths:
        raise ValueError("train_unlabelled: no images")
    if hidden_records is not None and len(hidden_records) != len(image_paths):
        raise ValueError("hidden_records must match image_paths one to one")
    tc = cfg.train
    cache = cache if cache is not None and cache.imgsz == tc.imgsz else LetterboxCache(tc.imgsz)
    seed_parts = tuple(seed_parts)
    total_steps = tc.max_steps if tc.max_steps is not None else batches_per_epoch(len(image_paths), tc.batch_size) * tc.epochs
    decay = resolve_ema_decay(cfg.ema_decay, total_steps)
    if teacher is None:
        teacher = EmaTeacher(model, decay, cfg.ema_ramp)
    else:
        teacher.decay, teacher.ramp = decay, cfg.ema_ramp
    teacher.reset(model)
    teacher.model.to(tc.device)
    weak, strong = weak_view(), strong_view(tc.scale, tc.translate)
    nms = NmsConfig(conf=cfg.nms_conf, iou=cfg.nms_iou, max_det=300, multi_label=False)
    loss_fn = PseudoLabelLoss(model.to(tc.device), cfg.pseudo_mode)
    empty = np.zeros((0, 4), np.float32)
    labelled_view = augment_view(cfg.labelled_augment, tc.scale, tc.translate)

    def make_batch(indices: np.ndarray, step: int):
        weak_images, gts = [], []
        for i in indices:
            path = image_paths[int(i)]
            seed = derive_seed(tc.seed, *seed_parts, step, int(i), 0)
            gt_boxes = cache.boxes(path, hidden_records[int(i)].boxes) if hidden_records is not None else empty
            image, gt_boxes, kept = apply_view(weak, cache.get(path), gt_boxes, seed)
            weak_images.append(image)
            gts.append((hidden_records[int(i)].classes[kept], gt_boxes) if hidden_records is not None else None)
        raw = teacher(to_model_batch(weak_images, device=tc.device)["img"])
        detections = postprocess(raw[0] if isinstance(raw, (tuple, list)) else raw, nms)
        counters = {"pseudo_reliable": 0.0, "pseudo_uncertain": 0.0, "pseudo_images": 0.0, "images_skipped": 0.0}
        images, classes, boxes, scores, uncertain = [], [], [], [], []
        for i, image, det, gt in zip(indices, weak_images, detections, gts):
            split = split_pseudo_labels(det, tc.imgsz, cfg.tau_low, cfg.tau_high)
            for key, value in count_pseudo_boxes(split, *(gt or (None, None))).items():
                counters[key] = counters.get(key, 0.0) + value
            if split.num_reliable < cfg.min_reliable_boxes:
                counters["images_skipped"] += 1
                continue
            use_uncertain = cfg.pseudo_mode != "drop"
            c = np.concatenate([split.reliable_classes, split.uncertain_classes if use_uncertain else []]).astype(np.int64)
            b = np.concatenate([split.reliable_boxes, split.uncertain_boxes if use_uncertain else empty])
            s = np.concatenate([split.reliable_scores, split.uncertain_scores if use_uncertain else []]).astype(np.float32)
            u = np.arange(len(c)) >= split.num_reliable
            image, b, kept = apply_view(strong, image, b, derive_seed(tc.seed, *seed_parts, step, int(i), 1))
            images.append(image)
            classes.append(c[kept])
            boxes.append(b)
            scores.append(s[kept])
            uncertain.append(u[kept])
            counters["pseudo_images"] += 1
        if labelled:
            rng = np.random.default_rng(derive_seed(tc.seed, *seed_parts, step, 2))
            picked = rng.choice(len(labelled), size=min(tc.batch_size, len(labelled)), replace=False)
            l_images, l_classes, l_boxes = labelled_views(labelled, picked, cache, labelled_view,
                                                          lambda i: derive_seed(tc.seed, *seed_parts, step, i, 3))
            images += l_images
            classes += l_classes
            boxes += l_boxes
            scores += [np.ones(len(c), np.float32) for c in l_classes]
            uncertain += [np.zeros(len(c), bool) for c in l_classes]
            counters["labelled_images"] = float(len(picked))
        if not images:
            return None, counters
        batch = to_model_batch(images, classes, boxes, tc.device)
        batch["pl_scores"] = torch.from_numpy(np.concatenate(scores)).to(tc.device)
        batch["pl_uncertain"] = torch.from_numpy(np.concatenate(uncertain)).to(tc.device)
        return batch, counters

    stats, _ = run_steps(model, len(image_paths), tc, make_batch, loss_fn, regulariser, None, seed_parts,
                         on_step_end=(lambda: teacher.update(model)) if cfg.ema_update == "step" else None, prefetch=False,
                         loss_hook=loss_hook)
    stats.extra.update(pseudo_box_quality(stats.extra))
    stats.extra = {k: v for k, v in stats.extra.items() if k not in ("true_boxes", "matched_reliable", "matched_uncertain")}
    stats.extra["ema_decay"] = decay
    stats.num_examples = len(image_paths)
    return stats
