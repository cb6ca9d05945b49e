"""Ultralytics detection models built from yaml: groups, full state in and out, export.

We call Ultralytics' ``DetectionModel`` directly (never its trainer). Parameter groups come from
the model's own yaml: ``backbone`` = the layers the yaml lists under ``backbone``, ``head`` = the
final detection module, ``neck`` = everything in between. This holds for v5u / v8 / 11 yamls at
any scale, with no hard-coded layer indices.
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

import detection  # noqa: F401  (configures Ultralytics before it is imported)
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import IterableSimpleNamespace
from ultralytics.nn.modules.head import Detect

from detection.atomic import atomic_write

GROUPS = ("backbone", "neck", "head")

# Ultralytics' default loss gains (ultralytics/cfg/default.yaml); v8DetectionLoss reads them from model.args.
LOSS_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class ModelError(ValueError):
    """A model yaml or checkpoint this project cannot use."""


@functools.lru_cache(maxsize=8)
def model_yaml_hash(model_yaml: str) -> str:
    """Hash (12 hex) of the architecture as this installation's Ultralytics reads ``model_yaml``.

    Two sites with the same hash build the same layers, so the broadcast arrays fit; the file's
    location is left out (it differs between installations).
    """
    from ultralytics.nn.tasks import yaml_model_load

    try:
        spec = yaml_model_load(str(model_yaml))
    except FileNotFoundError as exc:
        raise ModelError(f"{model_yaml}: no such Ultralytics model yaml ({exc})") from exc
    spec = {k: v for k, v in spec.items() if k != "yaml_file"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_model(model_yaml: str = "yolo11n.yaml", num_classes: int = 80, class_names: Iterable[str] | None = None,
                weights: str | Path | None = None) -> DetectionModel:
    """Build an fp32, unfused Ultralytics detection model from its yaml.

    Parameters
    ----------
    model_yaml : str
        An Ultralytics detection yaml (``yolo11n.yaml``, ``yolov8s.yaml``, ``yolov5nu.yaml``, ...) or a
        path to one. End-to-end heads (YOLOv10, YOLO26) are refused: FedSTO's pseudo labels and our
        loss assume a one-to-many head followed by NMS.
    num_classes : int
        Number of classes of the dataset.
    class_names : iterable of str, optional
        Names stored in the model (``model.names``) so exported checkpoints predict with them.
    weights : str or Path, optional
        A user's own ``.pt``/state-dict file; tensors whose name and shape match are loaded.

    Returns
    -------
    DetectionModel
        In train mode, on CPU, with ``model.args`` holding the loss gains.
    """
    name = Path(str(model_yaml)).name.lower()
    if name.startswith(("yolov10", "yolo26")):
        raise ModelError(f"{model_yaml}: end-to-end (NMS-free) heads are out of scope; use a v5u/v8/11 yaml such as yolo11n.yaml")
    try:
        model = DetectionModel(str(model_yaml), ch=3, nc=int(num_classes), verbose=False)
    except FileNotFoundError as exc:
        raise ModelError(f"{model_yaml}: no such Ultralytics model yaml ({exc})") from exc
    head = model.model[-1]
    # yolo26's head is a plain Detect class with one-to-one branches: check structure, not only the name
    end_to_end = model.yaml.get("end2end") or getattr(head, "one2one_cv2", None) is not None or getattr(head, "end2end", False)
    if type(head) is not Detect or end_to_end:
        raise ModelError(f"{model_yaml}: head {type(head).__name__} is not a plain Detect head (end-to-end or "
                         "non-detection heads are out of scope)")
    model.args = IterableSimpleNamespace(**LOSS_GAINS)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ModelError(f"{len(names)} class names given for {num_classes} classes")
    model.names = dict(enumerate(names))
    if weights is not None:
        load_matching_weights(model, weights)
    return model.float().train()


def load_matching_weights(model: torch.nn.Module, weights: str | Path) -> int:
    """Load tensors of a ``.pt`` (Ultralytics checkpoint or plain state dict) whose names and shapes match.

    Returns the number of tensors loaded; raises ``ModelError`` when none match.
    """
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    if isinstance(ckpt, Mapping) and "model" in ckpt:
        ckpt = ckpt["model"]
    state = ckpt.float().state_dict() if isinstance(ckpt, torch.nn.Module) else dict(ckpt)
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ModelError(f"{weights}: no tensor matches the model's names and shapes")
    model.load_state_dict(matching, strict=False)
    return len(matching)


def layer_groups(model: DetectionModel) -> list[str]:
    """Group name of every layer ``model.model[i]``, from the yaml structure."""
    n_layers = len(model.model)
    n_backbone = len(model.yaml["backbone"])
    return ["backbone" if i < n_backbone else "head" if i == n_layers - 1 else "neck" for i in range(n_layers)]


def group_of_key(key: str, groups_by_layer: list[str]) -> str:
    """Group of a ``state_dict``/parameter name such as ``model.4.cv1.conv.weight``."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "model" or not parts[1].isdigit():
        raise KeyError(f"{key}: not a layer tensor of an Ultralytics DetectionModel")
    return groups_by_layer[int(parts[1])]


def select_keys(model: DetectionModel, groups: Iterable[str], keys: Iterable[str] | None = None) -> list[str]:
    """Names (parameters and buffers) of the given groups, in ``state_dict`` order.

    >>> select_keys(model, ["backbone"])  # what phase-1 clients upload
    """
    wanted = set(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; expected some of {GROUPS}")
    by_layer = layer_groups(model)
    keys = model.state_dict().keys() if keys is None else keys
    return [k for k in keys if group_of_key(k, by_layer) in wanted]


def modules_of_group(model: DetectionModel, group: str) -> list[torch.nn.Module]:
    """Top-level layers of one group."""
    return [m for m, g in zip(model.model, layer_groups(model)) if g == group]


def get_state(model: torch.nn.Module, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """A detached fp32-preserving copy of the full ``state_dict`` (or of the given keys), on CPU."""
    state = model.state_dict()
    keys = state.keys() if keys is None else keys
    return {k: state[k].detach().to("cpu", copy=True) for k in keys}


def set_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy tensors into the model in place, keeping each tensor's own dtype.

    Averaging turns int64 BatchNorm counters into floats; copying in place casts them back. With
    ``strict`` every key of the model must be present (the full-state convention).
    """
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unknown or (strict and missing):
        raise KeyError(f"state does not fit the model: {len(unknown)} unknown keys (e.g. {unknown[:3]}), "
                       f"{len(missing)} missing keys (e.g. {missing[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise KeyError(f"{k}: shape {tuple(v.shape)} does not fit the model's {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].device))


def is_fixed_parameter(name: str) -> bool:
    """Parameters that never train: the DFL layer's fixed integral projection."""
    return ".dfl." in f".{name}"


def set_trainable_groups(model: DetectionModel, groups: Iterable[str]) -> list[str]:
    """Freeze every group not listed; frozen groups' BatchNorm layers go to eval mode.

    Call after ``model.train()``: eval mode on frozen BatchNorm keeps their running statistics from
    drifting on the local data. Returns the names of the trainable parameters.
    """
    wanted = set(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; expected some of {GROUPS}")
    trainable = []
    for layer, group in zip(model.model, layer_groups(model)):
        on = group in wanted
        for name, p in layer.named_parameters():
            # The DFL projection is a fixed arange, never trained (as in Ultralytics' trainer).
            p.requires_grad_(on and not is_fixed_parameter(name))
        if not on:
            for m in layer.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
    by_layer = layer_groups(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable.append(name)
    assert all(group_of_key(n, by_layer) in wanted for n in trainable)
    return trainable


def export_ultralytics(model: DetectionModel, path: str | Path, metadata: Mapping | None = None) -> Path:
    """Save a checkpoint that ``ultralytics.YOLO(path)`` loads and predicts with.

    Only Ultralytics classes and plain Python values are pickled, so the file loads in a process
    where this project is not importable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = copy.deepcopy(model).float().eval()
    for p in clean.parameters():
        p.requires_grad_(False)
    clean.args = {"task": "detect", "imgsz": int((metadata or {}).get("imgsz", 640)), **LOSS_GAINS}
    ckpt = {
        "model": clean,
        "train_args": dict(clean.args),
        "date": datetime.datetime.now().isoformat(),
        "version": "fedsto",
        "epoch": -1,
        "fedsto": {k: v for k, v in (metadata or {}).items() if isinstance(v, (str, int, float, bool))},
    }
    return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
