"""A client's work, without Flower: its data, one local round, the teacher check, its own evaluation.

The ClientApp (``client.app``) only unpacks messages and calls these, so every piece here is
testable in-process. Nothing about training survives between rounds but what a strategy saves on
the node's disk (``client.node_state``): the model comes from the broadcast, the optimiser and the
EMA teacher are made fresh inside :func:`train_round`, and the RNG comes from (seed, round,
partition). What *is* cached per process is read-only: the parsed site
(:class:`detection.sites.ClientSite`), a model template copied for each message, and the
letterboxed images within a byte budget (``client-image-cache-mb``), which never change during a run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch

from detection.images import LetterboxCache
from detection.loss_hooks import LossHook
from detection.metrics import NmsConfig, evaluate_records, predict_records
from detection.model import build_model
from detection.orthogonality import OrthogonalityRegulariser
from detection.pseudo_labels import count_pseudo_boxes, pseudo_box_quality, split_pseudo_labels
from detection.records import ImageRecord
from detection.seeds import derive_seed
from detection.sites import ClientSite, load_client_site
from detection.semi import SemiConfig, train_unlabelled
from detection.train import TrainConfig, TrainStats
from strategies.protocol import RoundInstructions

# Seed stream of the client-side regulariser's power-iteration vectors (apart from training streams).
ORTHO_STREAM = 0x0C1E


class NodeConfigError(ValueError):
    """A node config without a usable ``partition-id`` or ``site``."""


def node_partition(node_config: Mapping) -> tuple[int | None, str | None]:
    """Partition id and data location of this node, from its node config.

    Simulation gives exactly ``{"partition-id", "num-partitions"}`` (the data is the manifest
    the server names). A deployed SuperNode gets ``--node-config 'site="/data/site"'`` (its
    exported site folder, which says its partition; ``partition-id`` may be given too and must
    match), or ``federation="/path/federation.json" partition-id=N`` for a local copy of the
    full manifest.

    Returns
    -------
    (int or None, str or None)
        The partition id (None: the site manifest says it) and the node's own data path (None:
        use the manifest the server sends).
    """
    location = node_config.get("site") or node_config.get("federation")
    if "partition-id" not in node_config:
        if node_config.get("site"):
            return None, str(location)
        raise NodeConfigError(f"node config {dict(node_config)} has neither 'partition-id' nor 'site' "
                              "(start the SuperNode with --node-config 'site=\"/data/site\"' or 'partition-id=N')")
    pid = node_config["partition-id"]
    if isinstance(pid, bool) or not isinstance(pid, int) and not (isinstance(pid, str) and pid.isdigit()):
        raise NodeConfigError(f"node config partition-id={pid!r}: expected a non-negative integer")
    return int(pid), (str(location) if location else None)


@lru_cache(maxsize=16)
def _load_site(path: str, partition_id: int | None) -> ClientSite:
    return load_client_site(path, partition_id)


def load_site(path: str | os.PathLike, partition_id: int | None) -> ClientSite:
    """This client's data, parsed and checked once per process (only its own files are checked).

    ``path`` is a client site manifest or its folder (deployment) or the full manifest
    (simulation); both give the same :class:`~detection.sites.ClientSite`, the latter with the
    hidden labels used for diagnostics.
    """
    return _load_site(os.path.abspath(path), partition_id)


@lru_cache(maxsize=4)
def image_cache(imgsz: int, max_mb: int) -> LetterboxCache:
    """This process's letterboxed images at one size, within a byte budget, whichever partitions it serves.

    Paths are unique across partitions, so one cache serves them all; a Ray actor that trains many
    partitions one after the other holds at most ``max_mb`` of pixels, not every image it ever saw.
    """
    return LetterboxCache(imgsz, max_bytes=max_mb * 2**20)


def site_cache(ins: RoundInstructions) -> LetterboxCache:
    return image_cache(ins.imgsz, ins.client_image_cache_mb)


def resolve_device(device: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# Node config keys that override the run's settings for one node (a site with a smaller GPU, say).
NODE_OVERRIDES = {"device": ("device", str), "threads": ("client_threads", int), "batch-size": ("batch_size", int)}


def with_node_overrides(ins: RoundInstructions, node_config: Mapping) -> RoundInstructions:
    """The instructions with this node's ``device``, ``threads`` and ``batch-size`` from its node config."""
    changes = {}
    for key, (field_name, kind) in NODE_OVERRIDES.items():
        if key not in node_config:
            continue
        value = node_config[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "batch-size" else 0)):
            raise NodeConfigError(f"node config {key}={value!r}: expected an integer >= {1 if key == 'batch-size' else 0}")
        if kind is str and not (isinstance(value, str) and value):
            raise NodeConfigError(f"node config {key}={value!r}: expected a device such as \"cpu\", \"cuda\" or \"cuda:1\"")
        changes[field_name] = value
    return dataclasses.replace(ins, **changes) if changes else ins


def cuda_memory(device: str) -> str:
    """Peak and total memory of a CUDA device, for an out-of-memory message ("" elsewhere)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return ""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    peak, total = torch.cuda.max_memory_allocated(index), torch.cuda.get_device_properties(index).total_memory
    return f"peak {peak / 2**20:.0f} MiB allocated of {total / 2**20:.0f} MiB on {torch.cuda.get_device_name(index)}"


def set_threads(threads: int) -> int:
    """Torch CPU threads for this process: explicit, else the CPUs Ray assigned (OMP_NUM_THREADS)."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


@lru_cache(maxsize=4)
def _model_template(model_yaml: str, class_names: tuple[str, ...]) -> torch.nn.Module:
    # Built once per process with its own generator state, so building it draws nothing from
    # torch's global RNG (which would make a client's numbers depend on which message came first).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(model_yaml, len(class_names), list(class_names))


def build_client_model(ins: RoundInstructions, site: ClientSite) -> torch.nn.Module:
    """A model of the run's architecture (its weights come from the broadcast).

    A copy of a per-process template: parsing the yaml and building the layers for every message
    costs far more than copying the tensors.
    """
    return copy.deepcopy(_model_template(ins.model, tuple(site.class_names)))


def semi_config(ins: RoundInstructions, device: str) -> SemiConfig:
    """Pseudo-label training settings for one round from the instructions."""
    train = TrainConfig(imgsz=ins.imgsz, batch_size=ins.batch_size, lr=ins.lr, momentum=ins.momentum,
                        weight_decay=ins.weight_decay, epochs=ins.local_epochs, trainable=tuple(ins.trainable),
                        scale=ins.augment_scale, translate=ins.augment_translate, seed=ins.seed, device=device,
                        amp=ins.amp, progress=False, description=f"round {ins.server_round}")
    return SemiConfig(train=train, ema_decay=ins.ema_decay, ema_update=ins.ema_update, tau_low=ins.tau_low, tau_high=ins.tau_high,
                      nms_conf=ins.nms_conf, nms_iou=ins.nms_iou, pseudo_mode=ins.pseudo_mode,
                      min_reliable_boxes=ins.min_reliable_boxes)


def train_round(model: torch.nn.Module, site: ClientSite, ins: RoundInstructions,
                loss_hook: LossHook | None = None, device: str = "cpu") -> TrainStats:
    """One local round: pseudo-label training of ``ins.trainable`` with a fresh local EMA teacher.

    The orthogonality term (phase 2) is built here from the instructions; a strategy may add its
    own local term (``loss_hook``, which sees the batch, the outputs and the head's features).
    """
    ortho = None
    if ins.ortho_lambda > 0:
        ortho = OrthogonalityRegulariser(model, form=ins.ortho_form, coefficient=ins.ortho_lambda,
                                         seed=derive_seed(ins.seed, ins.server_round, site.partition_id, ORTHO_STREAM))
    return train_unlabelled(model, site.images, semi_config(ins, device), regulariser=ortho, loss_hook=loss_hook,
                            hidden_records=site.hidden, seed_parts=(ins.server_round, site.partition_id),
                            cache=site_cache(ins))


def evaluate_on_site(model: torch.nn.Module, site: ClientSite, imgsz: int, prefix: str, device: str = "cpu") -> dict[str, float]:
    """mAP of ``model`` on the site's evaluation set (``<prefix>_map50``, ``<prefix>_map50_95``).

    The set is the site's own labelled hold-out in deployment, its domain's test split in
    simulation; empty: no metrics.
    """
    if not site.eval_records:
        return {}
    result = evaluate_records(model, site.eval_records, imgsz, device=device)
    return {f"{prefix}_map50": result["map50"], f"{prefix}_map50_95": result["map50_95"]}


def teacher_check(model: torch.nn.Module, site: ClientSite, ins: RoundInstructions, device: str = "cpu",
                  max_images: int = 0) -> dict[str, float]:
    """How many pseudo boxes the (warm-up) model would give on this client's images.

    Runs the model as the round-1 teacher would (weak view = the plain image, NMS at
    ``nms_conf``/``nms_iou``, split at ``tau_low``/``tau_high``). In simulation the hidden labels
    add the true box density, precision and recall next to the counts; a deployed site has no
    labels and reports counts only.
    """
    images = site.images[:max_images] if max_images else site.images
    cache = site_cache(ins)
    records = site.hidden[:len(images)] if site.hidden is not None else [ImageRecord.from_labels(p, [], site.domain) for p in images]
    preds = predict_records(model, records, ins.imgsz, nms=NmsConfig(conf=ins.nms_conf, iou=ins.nms_iou, multi_label=False),
                            cache=cache, device=device)
    sums: dict[str, float] = {}
    for record, det in zip(records, preds):
        split = split_pseudo_labels(det, ins.imgsz, ins.tau_low, ins.tau_high)
        counts = count_pseudo_boxes(split, record.classes, cache.boxes(record.path, record.boxes))
        for key, value in counts.items():
            sums[key] = sums.get(key, 0.0) + value
    n = max(1, len(records))
    out = {"images": float(len(records)), "reliable_per_image": sums.get("pseudo_reliable", 0.0) / n,
           "uncertain_per_image": sums.get("pseudo_uncertain", 0.0) / n}
    if site.hidden is not None:
        quality = pseudo_box_quality(sums) if records else {}
        out.update({"true_per_image": sums.get("true_boxes", 0.0) / n,
                    "reliable_precision": quality.get("pseudo_reliable_precision", 0.0),
                    "reliable_recall": quality.get("pseudo_reliable_recall", 0.0)})
    return out


def finite_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """Metrics as floats for a MetricRecord (NaN/inf become -1 so a reply is never unserialisable)."""
    out = {}
    for k, v in values.items():
        v = float(v)
        out[k] = v if np.isfinite(v) else -1.0
    return out
