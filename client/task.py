"""A client's work, without Flower: its data, one local round, the teacher check, personal evaluation.

The ClientApp (``client.app``) only unpacks messages and calls these, so every piece here is
testable in-process. Nothing about training survives between rounds but what a strategy saves on
the node's disk (``client.node_state``): the model comes from the broadcast, the optimiser and the
EMA teacher are made fresh inside :func:`train_round`, and the RNG comes from (seed, round,
partition). What *is* cached per process is read-only: the parsed
manifest and the letterboxed images, which never change during a run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from detection.images import LetterboxCache
from detection.loss_hooks import LossHook
from detection.manifest_reader import Federation
from detection.metrics import NmsConfig, evaluate_records, predict_records
from detection.model import build_model
from detection.orthogonality import OrthogonalityRegulariser
from detection.pseudo_labels import count_pseudo_boxes, pseudo_box_quality, split_pseudo_labels
from detection.records import ImageRecord
from detection.seeds import derive_seed
from detection.semi import SemiConfig, train_unlabelled
from detection.train import TrainConfig, TrainStats
from strategies.protocol import RoundInstructions

# Seed stream of the client-side regulariser's power-iteration vectors (apart from training streams).
ORTHO_STREAM = 0x0C1E


class NodeConfigError(ValueError):
    """A node config without a usable ``partition-id``."""


def node_partition(node_config: Mapping) -> tuple[int, str | None]:
    """Partition id and optional manifest override of this node.

    Simulation gives exactly ``{"partition-id", "num-partitions"}``; a deployed SuperNode gets
    ``--node-config 'partition-id=0 federation="/data/federation.json"'``.
    """
    if "partition-id" not in node_config:
        raise NodeConfigError(f"node config {dict(node_config)} has no 'partition-id' "
                              "(start the SuperNode with --node-config 'partition-id=N')")
    pid = node_config["partition-id"]
    if isinstance(pid, bool) or not isinstance(pid, int) and not (isinstance(pid, str) and pid.isdigit()):
        raise NodeConfigError(f"node config partition-id={pid!r}: expected a non-negative integer")
    override = node_config.get("federation")
    return int(pid), (str(override) if override else None)


@lru_cache(maxsize=4)
def load_federation(path: str) -> Federation:
    """The manifest, parsed once per process (files are checked on the first load)."""
    return Federation.load(path)


@lru_cache(maxsize=16)
def image_cache(manifest: str, pid: int, imgsz: int) -> LetterboxCache:
    """Letterboxed images of one partition at one size (read-only; reused across rounds)."""
    return LetterboxCache(imgsz)


@dataclass
class ClientData:
    """What one client holds: unlabelled images, hidden labels (diagnostics only), its domain's test split."""

    federation: Federation
    partition_id: int
    images: list[str]
    hidden: list[ImageRecord]
    domain: str

    @classmethod
    def load(cls, manifest: str | os.PathLike, partition_id: int) -> "ClientData":
        fed = load_federation(str(Path(manifest).resolve()))
        return cls(fed, partition_id, fed.client_images(partition_id), fed.client_hidden_records(partition_id),
                   fed.client_domain(partition_id))

    def test_records(self) -> list[ImageRecord]:
        return self.federation.test_records(self.domain)[self.domain]

    def cache(self, imgsz: int) -> LetterboxCache:
        return image_cache(str(self.federation.path), self.partition_id, imgsz)


def resolve_device(device: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def set_threads(threads: int) -> int:
    """Torch CPU threads for this process: explicit, else the CPUs Ray assigned (OMP_NUM_THREADS)."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def build_client_model(ins: RoundInstructions, data: ClientData) -> torch.nn.Module:
    """An empty model of the run's architecture (weights come from the broadcast)."""
    names = data.federation.class_names
    return build_model(ins.model, len(names), names)


def semi_config(ins: RoundInstructions, device: str) -> SemiConfig:
    """Pseudo-label training settings for one round from the instructions."""
    train = TrainConfig(imgsz=ins.imgsz, batch_size=ins.batch_size, lr=ins.lr, momentum=ins.momentum,
                        weight_decay=ins.weight_decay, epochs=ins.local_epochs, trainable=tuple(ins.trainable),
                        seed=ins.seed, device=device, progress=False, description=f"round {ins.server_round}")
    return SemiConfig(train=train, ema_decay=ins.ema_decay, tau_low=ins.tau_low, tau_high=ins.tau_high,
                      nms_conf=ins.nms_conf, nms_iou=ins.nms_iou, pseudo_mode=ins.pseudo_mode,
                      min_reliable_boxes=ins.min_reliable_boxes)


def train_round(model: torch.nn.Module, data: ClientData, ins: RoundInstructions,
                loss_hook: LossHook | None = None, device: str = "cpu") -> TrainStats:
    """One local round: pseudo-label training of ``ins.trainable`` with a fresh local EMA teacher.

    The orthogonality term (phase 2) is built here from the instructions; a strategy may add its
    own local term (``loss_hook``, which sees the batch, the outputs and the head's features).
    """
    ortho = None
    if ins.ortho_lambda > 0:
        ortho = OrthogonalityRegulariser(model, form=ins.ortho_form, coefficient=ins.ortho_lambda,
                                         seed=derive_seed(ins.seed, ins.server_round, data.partition_id, ORTHO_STREAM))
    return train_unlabelled(model, data.images, semi_config(ins, device), regulariser=ortho, loss_hook=loss_hook,
                            hidden_records=data.hidden, seed_parts=(ins.server_round, data.partition_id),
                            cache=data.cache(ins.imgsz))


def evaluate_personal(model: torch.nn.Module, data: ClientData, imgsz: int, device: str = "cpu") -> dict[str, float]:
    """mAP of the locally trained model on this client's own domain test split."""
    result = evaluate_records(model, data.test_records(), imgsz, device=device)
    return {"personal_map50": result["map50"], "personal_map50_95": result["map50_95"]}


def teacher_check(model: torch.nn.Module, data: ClientData, ins: RoundInstructions, device: str = "cpu",
                  max_images: int = 0) -> dict[str, float]:
    """How many pseudo boxes the (warm-up) model would give on this client's images.

    Runs the model as the round-1 teacher would (weak view = the plain image, NMS at
    ``nms_conf``/``nms_iou``, split at ``tau_low``/``tau_high``). Hidden labels are used only to
    report the true box density, precision and recall next to the counts.
    """
    records = data.hidden[:max_images] if max_images else data.hidden
    preds = predict_records(model, records, ins.imgsz, nms=NmsConfig(conf=ins.nms_conf, iou=ins.nms_iou),
                            cache=data.cache(ins.imgsz), device=device)
    sums: dict[str, float] = {}
    for record, det in zip(records, preds):
        split = split_pseudo_labels(det, ins.imgsz, ins.tau_low, ins.tau_high)
        counts = count_pseudo_boxes(split, record.classes, data.cache(ins.imgsz).boxes(record.path, record.boxes))
        for key, value in counts.items():
            sums[key] = sums.get(key, 0.0) + value
    quality = pseudo_box_quality(sums) if records else {}
    n = max(1, len(records))
    return {"images": float(len(records)), "reliable_per_image": sums.get("pseudo_reliable", 0.0) / n,
            "uncertain_per_image": sums.get("pseudo_uncertain", 0.0) / n, "true_per_image": sums.get("true_boxes", 0.0) / n,
            "reliable_precision": quality.get("pseudo_reliable_precision", 0.0),
            "reliable_recall": quality.get("pseudo_reliable_recall", 0.0)}


def finite_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """Metrics as floats for a MetricRecord (NaN/inf become -1 so a reply is never unserialisable)."""
    out = {}
    for k, v in values.items():
        v = float(v)
        out[k] = v if np.isfinite(v) else -1.0
    return out
