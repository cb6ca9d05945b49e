"""The warm-up, trained once: its end-of-warm-up checkpoint kept under a key of all that decides it.

``partial``, ``ssfl``, ``fedsto-st`` and ``fedsto`` start with the same supervised warm-up on the
server's labels. The first run that trains it stores the checkpoint it wrote after its last
warm-up epoch (model, optimiser momentum, RNG states, the loop's counters) and the warm-up's
metrics rows; a later run with the same key loads them and goes straight to round 1, exactly as
a resume after the warm-up would, so it ends with the same numbers as a run that trained the
warm-up itself.

The key is a SHA-256 over: the federation manifest's bytes and whose labels train (server or
all), the model yaml's content and the starting weights' bytes, every knob the warm-up reads
(image size, batch, optimiser, augmentation, epochs, lr ramp, seed), the device kind, the
strategy when it adds a term to the server's loss, and :data:`detection.train.RECIPE_VERSION`,
which is raised whenever the training code's behaviour changes. Entries live in
``$FEDSTO_HOME/warmups/<key>/`` (``warmup.pt`` and a readable ``key.json``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detection.atomic import atomic_write, atomic_write_text
from detection.model import model_yaml_hash
from detection.train import RECIPE_VERSION

# RunConfig fields (snake_case) that change what the warm-up does.
WARMUP_KNOBS = ("imgsz", "batch_size", "lr", "momentum", "weight_decay", "server_augment", "augment_scale",
                "augment_translate", "warmup_epochs", "warmup_lr_steps", "seed", "model", "weights", "amp")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def warmup_key(cfg, manifest: str | Path, labels: str, device: str, strategy: str = "") -> tuple[str, dict[str, Any]]:
    """``(key, what it is made of)`` for a run's warm-up.

    Parameters
    ----------
    cfg : server.config.RunConfig
        The run's knobs (only :data:`WARMUP_KNOBS` count).
    manifest : path
        The federation manifest the server reads.
    labels : str
        ``server`` or ``all`` (``full`` warms up on every label).
    device : str
        The resolved device; only its kind (``cpu``, ``cuda``) counts.
    strategy : str
        The strategy's description when it changes the server's loss, else "".
    """
    parts: dict[str, Any] = {name: getattr(cfg, name) for name in WARMUP_KNOBS}
    parts.update(manifest_sha256=file_sha256(manifest), labels=labels, model_yaml=model_yaml_hash(cfg.model),
                 weights_sha256=file_sha256(cfg.weights) if cfg.weights else "", device=torch.device(device).type,
                 strategy=strategy, recipe_version=RECIPE_VERSION)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return key, parts


class WarmupCache:
    """Warm-up checkpoints by key under ``root``.

    Parameters
    ----------
    root : path
        Folder of the entries (``$FEDSTO_HOME/warmups``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> dict | None:
        """The stored entry (``checkpoint``, ``metrics``, ``seconds``, ``created``), or None."""
        path = self.folder(key) / "warmup.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def longest_prefix(self, parts: Mapping[str, Any]) -> tuple[str, dict] | None:
        """``(key, entry)`` of the longest stored warm-up that this one continues, or None.

        A warm-up of E epochs whose every other part equals one stored with k < E epochs is that
        one plus E - k epochs: the lr is constant after the first epoch's ramp and every epoch
        is seeded by its own index, so nothing in the first k epochs depends on E. A longer
        warm-up therefore starts from the stored shorter one instead of from scratch.
        """
        wanted = {k: v for k, v in parts.items() if k != "warmup_epochs"}
        best: tuple[int, str] | None = None
        for key_file in self.root.glob("*/key.json") if self.root.is_dir() else []:
            try:
                theirs = json.loads(key_file.read_text())
            except (OSError, ValueError):
                continue
            epochs = theirs.pop("warmup_epochs", None)
            if (theirs == json.loads(json.dumps(wanted)) and isinstance(epochs, int)
                    and epochs < parts["warmup_epochs"] and (best is None or epochs > best[0])
                    and (key_file.parent / "warmup.pt").is_file()):
                best = (epochs, key_file.parent.name)
        if best is None:
            return None
        entry = self.load(best[1])
        return (best[1], entry) if entry is not None else None

    def save(self, key: str, parts: Mapping[str, Any], checkpoint: Mapping[str, Any], metrics: list[dict],
             seconds: float) -> Path:
        """Store an entry; an existing one is left as it is (same key, same content)."""
        folder = self.folder(key)
        path = folder / "warmup.pt"
        if path.is_file():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"checkpoint": dict(checkpoint), "metrics": list(metrics), "seconds": float(seconds),
                 "created": time.strftime("%Y-%m-%d %H:%M:%S"), "key": dict(parts)}
        atomic_write_text(folder / "key.json", json.dumps(dict(parts), indent=2, sort_keys=True) + "\n")
        return atomic_write(path, lambda tmp: torch.save(entry, tmp))
