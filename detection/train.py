"""The project's one training loop for labelled images (server warm-up, server epochs, baselines).

Flat and readable, in the spirit of torchvision's detection ``engine.py``: shuffle, build a batch,
forward, Ultralytics' detection loss (plus an optional regulariser), backward, clip, step. The
semi-supervised client loop (``detection.semi``) reuses :func:`run_steps` with its own batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import detection  # noqa: F401
from ultralytics.utils.loss import v8DetectionLoss

from detection.images import LetterboxCache, to_model_batch
from detection.loss_hooks import HeadTap, LossContext, LossHook, record_assignments
from detection.model import GROUPS, set_trainable_groups
from detection.records import ImageRecord
from detection.seeds import derive_seed
from detection.views import SCALE, TRANSLATE, apply_view, strong_view, supervised_view, weak_view


# Raise whenever a change to the training code changes what a training call does with the same
# settings (augmentation, loss weighting, batching...): cached warm-ups of older versions are then
# not reused (server/warmup_cache.py). 2: scale/translate augmentation, per-image regulariser.
# 3: images resized as Ultralytics resizes them (bilinear, sides rounded up; was INTER_AREA).
RECIPE_VERSION = 3


@dataclass
class TrainConfig:
    """Settings of one local training call.

    Parameters
    ----------
    imgsz : int
        Square letterbox size.
    batch_size : int
        Images per optimiser step.
    lr, momentum, weight_decay : float
        SGD settings (the paper: constant lr 0.01; momentum and weight decay as Ultralytics).
    epochs : int
        Passes over the data; ``max_steps`` caps the number of optimiser steps instead when set.
    warmup_steps : int
        Linear learning-rate ramp at the start of the call (useful from scratch; 0 in rounds).
    trainable : tuple of str
        Parameter groups that train; the others are frozen with BatchNorm in eval mode.
    augment : str
        ``standard`` (flip, Ultralytics' HSV jitter, scale and translation), ``weak`` (flip),
        ``strong`` (the student's view) or ``none``.
    scale, translate : float
        Zoom ``1 +- scale`` and shift ``+- translate`` of the image size in the ``standard`` and
        ``strong`` views (Ultralytics' defaults 0.5 and 0.1).
    seed : int
        With ``seed_parts`` of the caller (round, node, ...) fixes shuffling and augmentation.
    grad_clip : float
        Max gradient norm (Ultralytics uses 10).
    device : str
        ``cpu``, ``cuda``, ``cuda:1``...
    prefetch : bool, optional
        Build the next labelled batch in a worker thread while the current one trains (None: on
        CUDA only, where decoding and augmentation would otherwise starve the GPU).
    amp : bool
        Mixed precision on CUDA (float16 autocast of the forward pass and the detection loss,
        gradient scaling); ignored on other devices.
    progress : bool
        Show a rich progress bar over the steps.
    """

    imgsz: int = 160
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 0
    trainable: tuple[str, ...] = GROUPS
    augment: str = "standard"
    scale: float = SCALE
    translate: float = TRANSLATE
    seed: int = 0
    grad_clip: float = 10.0
    device: str = "cpu"
    amp: bool = False
    prefetch: bool | None = None
    progress: bool = False
    description: str = "train"

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig(**{**asdict(self), **changes})


@dataclass
class TrainStats:
    """What a training call did: steps, images seen, mean losses, time, and extra counters."""

    steps: int = 0
    images: int = 0
    num_examples: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}steps": float(self.steps), f"{prefix}images": float(self.images),
               f"{prefix}seconds": self.seconds}
        out.update({f"{prefix}loss_{k}": v for k, v in self.losses.items()})
        out.update({f"{prefix}{k}": v for k, v in self.extra.items()})
        return out


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, state: Mapping | None = None) -> torch.optim.SGD:
    """SGD with Ultralytics' grouping: weight decay on conv/linear weights only, not on BatchNorm or biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
            (no_decay if name == "bias" or is_norm else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if state is not None:
        opt.load_state_dict(dict(state))
    return opt


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=True)


def batches_per_epoch(n_items: int, batch_size: int) -> int:
    """Full batches only (a 1-image BatchNorm batch is noise), but at least one batch."""
    return max(1, n_items // batch_size)


def add_per_image_penalty(detection_loss: torch.Tensor, penalty: torch.Tensor, images: int) -> torch.Tensor:
    """``detection_loss + images * penalty``: a regulariser weighted per image, like the detection loss.

    Ultralytics' ``v8DetectionLoss`` returns its per-image mean loss multiplied by the number of
    images in the batch, so a penalty added once would weigh ``batch``-times less at batch 64 than
    at batch 1. Scaling it by the same count makes a coefficient (``ortho-lambda``) mean the same at
    every batch size: it is relative to the detection loss of one image.
    """
    return detection_loss + images * penalty


def shuffled_batches(n_items: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
    """``(step, indices)`` of each step: epochs of shuffled indices, cut into batches (a batch may span two epochs)."""
    order = np.zeros(0, np.int64)
    take = min(batch_size, n_items)
    for step in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n_items)])
        indices, order = order[:take], order[take:]
        yield step, indices


_END = object()


def prefetched(items: Iterator) -> Iterator:
    """The items of ``items``, each computed in a worker thread while the caller works on the previous one.

    Image decoding and augmentation then overlap the GPU's forward and backward pass. Only for
    batches that do not depend on the model (labelled training): the semi-supervised batch asks
    the EMA teacher, which the step before must have updated first.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="batches") as pool:
        future = pool.submit(next, items, _END)
        while (item := future.result()) is not _END:
            future = pool.submit(next, items, _END)
            yield item


def run_steps(model: torch.nn.Module, n_items: int, cfg: TrainConfig,
              make_batch: Callable[[np.ndarray, int], tuple[dict, dict[str, float]]],
              loss_fn: Callable, regulariser: Callable[[], torch.Tensor] | None = None,
              optimizer_state: Mapping | None = None, seed_parts: Sequence[int] = (),
              on_step_end: Callable[[], None] | None = None, loss_hook: LossHook | None = None,
              prefetch: bool | None = None) -> tuple[TrainStats, dict]:
    """The loop: shuffle ``n_items`` indices, batch, forward, loss, backward, step.

    ``make_batch(indices, step)`` returns the model batch (Ultralytics' format), or None when the
    step has nothing to learn from (counted as ``steps_skipped``), and per-batch counters to sum;
    ``loss_fn(preds, batch)`` returns ``(loss, loss_items)``; ``regulariser()`` returns a per-image
    penalty, added once per image of the batch (:func:`add_per_image_penalty`); ``on_step_end`` runs after each
    optimiser step (the EMA teacher's update); ``loss_hook`` (a strategy's local term, see
    :mod:`detection.loss_hooks`) adds to the loss and runs its own work after the step;
    ``prefetch`` builds the next batch in a worker thread (:func:`prefetched`; default: on CUDA
    only) and must stay off when ``make_batch`` reads the model. Returns the stats and the
    optimiser's state.
    """
    device = torch.device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.to(device).train()
    set_trainable_groups(model, cfg.trainable)
    optimizer = build_optimizer(model, cfg, optimizer_state)
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_epoch = batches_per_epoch(n_items, cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else per_epoch * cfg.epochs
    rng = np.random.default_rng(derive_seed(cfg.seed, *seed_parts))
    stats, sums, counters = TrainStats(num_examples=n_items), {}, {}
    start = time.perf_counter()
    tap = HeadTap(model) if loss_hook is not None and loss_hook.needs_features else None
    recorder = record_assignments(loss_fn) if loss_hook is not None and loss_hook.needs_assignment else None
    batches = ((step, indices, make_batch(indices, step)) for step, indices in shuffled_batches(n_items, cfg.batch_size, total, rng))
    if device.type == "cuda" if prefetch is None else prefetch:
        batches = prefetched(batches)
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task(cfg.description, total=total, info="")
        for step, indices, (batch, batch_counters) in batches:
            for k, v in batch_counters.items():
                counters[k] = counters.get(k, 0.0) + float(v)
            if batch is None:
                counters["steps_skipped"] = counters.get("steps_skipped", 0.0) + 1
                bar.update(task, advance=1)
                continue
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                preds = model(batch["img"])
                loss, items = loss_fn(preds, batch)
            loss = loss.float().sum()
            if regulariser is not None:
                reg = regulariser()
                loss = add_per_image_penalty(loss, reg, batch["img"].shape[0])
                items = {**items, "ortho": reg.detach()}
            if loss_hook is not None:
                context = LossContext(model, batch, preds, step, tap, recorder)
                term, more = loss_hook.loss(context)
                if term is not None:
                    loss = loss + term
                items = {**items, **more}
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.description}: non-finite loss at step {step} ({ {k: float(v) for k, v in items.items()} })")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # without AMP the scaler passes everything through
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if on_step_end is not None:
                on_step_end()
            if loss_hook is not None:
                items = {**items, **loss_hook.after_step(context)}
            for k, v in items.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            stats.steps += 1
            stats.images += len(indices)
            bar.update(task, advance=1, info=" ".join(f"{k} {float(v):.3f}" for k, v in items.items()))
    if tap is not None:
        tap.close()
    stats.seconds = time.perf_counter() - start
    stats.losses = {k: v / max(1, stats.steps) for k, v in sums.items()}
    stats.extra = counters
    return stats, optimizer.state_dict()


AUGMENTS = {"standard": supervised_view, "weak": lambda scale, translate: weak_view(), "strong": strong_view,
            "none": lambda scale, translate: None}


def augment_view(name: str, scale: float = SCALE, translate: float = TRANSLATE):
    """The view an ``augment`` name stands for (None for ``none``)."""
    if name not in AUGMENTS:
        raise ValueError(f"augment={name!r}: expected one of {', '.join(AUGMENTS)}")
    return AUGMENTS[name](scale, translate)


def labelled_views(records: Sequence[ImageRecord], indices: Iterable[int], cache: LetterboxCache, view,
                   seed_of: Callable[[int], int]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Letterboxed images of ``records[indices]`` under ``view`` (None: as they are), with their classes and boxes."""
    images, classes, boxes = [], [], []
    for i in indices:
        r = records[int(i)]
        image, b, c = cache.get(r.path), cache.boxes(r.path, r.boxes), r.classes
        if view is not None:
            image, b, kept = apply_view(view, image, b, seed_of(int(i)))
            c = c[kept]
        images.append(image)
        classes.append(c)
        boxes.append(b)
    return images, classes, boxes


def train_labelled(model: torch.nn.Module, records: Sequence[ImageRecord], cfg: TrainConfig, *,
                   optimizer_state: Mapping | None = None, regulariser: Callable[[], torch.Tensor] | None = None,
                   cache: LetterboxCache | None = None, seed_parts: Iterable[int] = (),
                   loss_hook: LossHook | None = None) -> tuple[TrainStats, dict]:
    """Supervised training on labelled records with Ultralytics' detection loss.

    Parameters
    ----------
    model : DetectionModel
        Trained in place.
    records : sequence of ImageRecord
        Labelled images.
    cfg : TrainConfig
        Loop settings (epochs or steps, optimiser, trainable groups, augmentation).
    optimizer_state : mapping, optional
        State of a previous call's optimiser (momentum); fresh optimiser when None.
    regulariser : callable, optional
        Returns a differentiable per-image penalty (e.g. the orthogonality term), added once per
        image of each batch, as Ultralytics' detection loss is.
    cache : LetterboxCache, optional
        Reuse letterboxed images across calls.
    seed_parts : iterable of int
        Extra seed parts (round, node, epoch) so each call draws its own shuffles and views.
    loss_hook : LossHook, optional
        A strategy's extra term that sees the batch, outputs and head features (FRAug on the server).

    Returns
    -------
    (TrainStats, dict)
        Stats and the optimiser state.
    """
    if not records:
        raise ValueError("train_labelled: no labelled images")
    cache = cache if cache is not None and cache.imgsz == cfg.imgsz else LetterboxCache(cfg.imgsz)
    seed_parts = tuple(seed_parts)
    view = augment_view(cfg.augment, cfg.scale, cfg.translate)
    loss_fn = v8DetectionLoss(model.to(cfg.device))

    def make_batch(indices: np.ndarray, step: int):
        images, classes, boxes = labelled_views(records, indices, cache, view, lambda i: derive_seed(cfg.seed, *seed_parts, step, i))
        return to_model_batch(images, classes, boxes, cfg.device), {"boxes": float(sum(len(c) for c in classes))}

    stats, opt_state = run_steps(model, len(records), cfg, make_batch, loss_fn, regulariser, optimizer_state, seed_parts,
                                 loss_hook=loss_hook, prefetch=cfg.prefetch)
    stats.num_examples = len(records)
    return stats, opt_state
