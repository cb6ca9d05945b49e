"""The run configuration: typed, validated, from ``context.run_config``.

Flower passes ``[tool.flwr.app.config]`` (merged with ``--run-config`` overrides) as a flat dict
of scalars with kebab-case keys. :class:`RunConfig` turns it into one typed object that both the
ServerApp and the ClientApp read, so a knob has one name, one type and one default. Defaults here
are the paper's where it gives them (DESIGN.md, "FedSTO details"); pyproject's section repeats
them and ``tests/test_server_config.py`` checks both agree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from detection.ema import parse_ema_decay
from detection.orthogonality import FORMS as ORTHO_FORMS
from detection.pseudo_labels import PSEUDO_MODES
from detection.semi import EMA_UPDATES
from detection.train import AUGMENTS
from detection.ultralytics_env import fedsto_home
from strategies import StrategyError, get_strategy
from strategies.protocol import ClientKnobs
from strategies.transport import ENCODINGS as TRANSPORT_ENCODINGS

METHODS = ("partial", "full", "ssfl", "fedsto-st", "fedsto")
# Knobs with a fixed set of values, and where each set is defined.
SERVER_MOMENTUM = ("carry", "reset")
CHOICES = {"method": METHODS, "server_augment": AUGMENTS, "pseudo_mode": PSEUDO_MODES, "ortho_form": ORTHO_FORMS,
           "server_momentum": SERVER_MOMENTUM, "ema_update": EMA_UPDATES, "transport": TRANSPORT_ENCODINGS}


class ConfigError(ValueError):
    """A run-config value of the wrong type or out of range (the key is named)."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class RunConfig(ClientKnobs):
    """Every knob of a federated run (keys in ``pyproject.toml`` are the field names in kebab-case).

    The knobs that travel to clients (model, training, pseudo-label and regulariser settings,
    ``strategy``, ``seed``, ``client_threads``) are inherited from
    :class:`strategies.protocol.ClientKnobs` and documented there; the rest are the server's.

    Parameters
    ----------
    method : str
        ``partial`` (server labels only, compute-matched), ``full`` (all labels: upper bound),
        ``ssfl`` (all parameters every round, local EMA pseudo labels, no regulariser),
        ``fedsto-st`` (warm-up + phase 1), ``fedsto`` (warm-up + phase 1 + phase 2).
    federation : str
        Federation manifest (``federation.json`` or its folder; in deployment the server's site
        folder from ``fedsto data export-site``, or its ``site.json``). Relative paths are relative to
        ``$FEDSTO_HOME`` (default ``~/.cache/fedsto``): the ServerApp's working directory is
        wherever the SuperLink was started, so the cwd is never used.
    synthetic_images : int
        When > 0 and the manifest is missing, build a synthetic weather federation there with this
        many scenes (server domain ``clear``; client domains ``synthetic_weathers``).
    synthetic_weathers : str
        Comma-separated weather domains of the synthetic federation.
    synthetic_clients : int
        Clients of the synthetic federation (simulation: ``num-supernodes`` must match).
    synthetic_server_fraction, synthetic_test_fraction : float
        Server and test shares of the synthetic federation.
    synthetic_imgsz : int
        Side of the synthetic scenes in pixels.
    weights : str
        Optional ``.pt`` to start from ("" = from scratch).
    server_augment : str
        Augmentation of the server's supervised epochs: ``strong`` (flip, scale jitter, colour
        jitter, blur, grey, cutout: the student's view), ``standard`` (flip + Ultralytics' HSV
        jitter), ``weak`` (flip) or ``none``. YOLOv5, the
        paper's detector, trains with HSV/scale/mosaic augmentation; flip alone gives a teacher
        that sees next to nothing on snowy or foggy images (measured: snowy mAP50 0.015 vs 0.24).
    server_momentum : str
        The server's SGD momentum after a client round replaces its weights by the aggregate:
        ``carry`` it into the next server epoch, or ``reset`` it (momentum built on the old
        weights points the wrong way for the new ones).
    warmup_epochs : int
        Supervised server epochs before round 1 (paper: 50).
    warmup_lr_steps : int
        Linear learning-rate ramp over the first optimiser steps of the warm-up (from scratch).
    warmup_cache : bool
        Reuse a warm-up trained by an earlier run with the same key, and store the one trained
        here (``$FEDSTO_HOME/warmups``; see :mod:`server.warmup_cache`).
    phase1_rounds, phase2_rounds : int
        Rounds of selective backbone training and of full-parameter training with the
        orthogonality regulariser (paper: 100 and 150). ``ssfl``, ``partial`` and ``full`` run
        ``phase1_rounds + phase2_rounds`` rounds; ``fedsto-st`` runs ``phase1_rounds``.
    server_epochs : int
        Supervised server epochs per round (paper: 1).
    ortho_lambda : float
        Orthogonality coefficient in phase 2 (the paper gives none), relative to the detection loss
        of one image: each image of a batch adds ``ortho-lambda * sum of spectral norms``, so the
        coefficient means the same at every batch size. The default, 6.25e-6, is the 1e-4 per
        batch of 16 that the demo was tuned with before the penalty was counted per image.
    fraction_train : float
        Fraction of clients sampled per round (by partition id, seeded).
    min_reply_fraction : float
        A round with fewer successful replies than this fraction of the sampled clients fails the run.
    reply_guard : bool
        Reject malformed train replies before aggregation (NaN/Inf, wrong shape, dtype or keys,
        a bad example count); each rejection counts as a failure of its round. A second reply of
        one partition is rejected whatever this says.
    round_timeout : float
        Seconds to wait for the replies of a round.
    discovery_timeout : float
        Seconds to wait for the partitions the first client round samples to answer the partition
        query (the discovery rule: docs/deployment.md).
    eval_every : int
        Evaluate the server model (and the clients' personalised models) every N rounds; the last
        round and the end of the warm-up are always evaluated.
    eval_personal : bool
        Ask clients to evaluate their locally trained model on their own domain in eval rounds.
    teacher_check_clients : int
        Clients whose pseudo boxes are counted before round 1 (0: all; else a seeded sample).
    weak_teacher_map50 : float
        Warn loudly when the warm-up model's server-domain mAP50 is below this.
    weak_teacher_density : float
        Warn loudly when a client's reliable pseudo boxes per image fall below this fraction of
        the server's labelled boxes per image.
    weak_teacher_precision : float
        Warn loudly when fewer than this fraction of a client's reliable pseudo boxes match a true
        box (measured with the hidden labels, which only diagnostics may read).
    output_dir : str
        Run directory. Relative paths go under ``$FEDSTO_HOME/runs``; "" = ``<method>-<date>-<time>``.
    resume : str
        A run directory to continue from its last checkpoint ("" = fresh run).
    keep_checkpoints : int
        Regular checkpoints kept (the best one is kept in addition).
    server_threads : int
        Torch CPU threads of the server (0 = all cores).
    tensorboard, mlflow : bool
        Also log to TensorBoard / MLflow when the package is installed (skipped quietly if not).
    progress : bool
        Rich progress bars in the server's output.
    """

    method: str = "fedsto"
    federation: str = "federations/synthetic-weather"
    synthetic_images: int = 1600
    synthetic_weathers: str = "rainy,snowy,foggy"
    synthetic_clients: int = 3
    synthetic_server_fraction: float = 0.25
    synthetic_test_fraction: float = 0.15
    synthetic_imgsz: int = 160
    weights: str = ""
    server_augment: str = "strong"
    server_momentum: str = "carry"
    warmup_epochs: int = 50
    warmup_lr_steps: int = 50
    warmup_cache: bool = True
    phase1_rounds: int = 100
    phase2_rounds: int = 150
    server_epochs: int = 1
    ortho_lambda: float = 6.25e-06
    fraction_train: float = 1.0
    min_reply_fraction: float = 1.0
    reply_guard: bool = True
    round_timeout: float = 3600.0
    discovery_timeout: float = 300.0
    eval_every: int = 10
    eval_personal: bool = True
    teacher_check_clients: int = 0
    weak_teacher_map50: float = 0.25
    weak_teacher_density: float = 0.25
    weak_teacher_precision: float = 0.3
    output_dir: str = ""
    resume: str = ""
    keep_checkpoints: int = 2
    server_threads: int = 0
    tensorboard: bool = False
    mlflow: bool = False
    progress: bool = True

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], strict: bool = True) -> "RunConfig":
        """Parse Flower's run config (kebab-case keys, scalars).

        Parameters
        ----------
        run_config : mapping
            ``context.run_config``; missing keys take the defaults above.
        strict : bool
            Raise on keys this class does not know (a typo would otherwise be silently ignored).

        Raises
        ------
        ConfigError
            Naming the key, the value and what was expected.
        """
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(k for k in run_config if k not in known)
        if unknown and strict:
            raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        values = {}
        for key, f in known.items():
            if key in run_config:
                values[f.name] = _coerce(key, run_config[key], f.type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """Back to Flower's flat kebab-case form (the resolved config written to the run dir)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "RunConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Range and choice checks; raises :class:`ConfigError` naming the key."""
        def fail(name: str, expected: str) -> None:
            raise ConfigError(f"run-config {_key(name)}={getattr(self, name)!r}: expected {expected}")

        for f in fields(self):
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                fail(f.name, "a finite number")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                fail(name, f"one of {', '.join(choices)}")
        for name in ("warmup_epochs", "warmup_lr_steps", "phase1_rounds", "phase2_rounds", "min_reliable_boxes",
                     "synthetic_images", "server_threads", "client_threads", "server_epochs", "seed", "teacher_check_clients"):
            if getattr(self, name) < 0:
                fail(name, "an integer >= 0")
        for name in ("imgsz", "batch_size", "local_epochs", "eval_every", "keep_checkpoints", "synthetic_clients", "client_image_cache_mb",
                     "synthetic_imgsz"):
            if getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        if self.imgsz % 32:
            fail("imgsz", "a multiple of 32 (the detector's largest stride)")
        for name in ("fraction_train", "min_reply_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(name, "a number in (0, 1]")
        for name in ("synthetic_server_fraction", "synthetic_test_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, "a number in (0, 1)")
        if self.tau_low > self.tau_high:
            raise ConfigError(f"run-config tau-low={self.tau_low!r} > tau-high={self.tau_high!r}: expected tau-low <= tau-high")
        for name in ("tau_low", "tau_high", "nms_conf", "nms_iou", "momentum", "weak_teacher_map50", "weak_teacher_density",
                     "weak_teacher_precision"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "a number in [0, 1]")
        if not 0.0 <= self.augment_scale < 1.0:
            fail("augment_scale", "a number in [0, 1)")
        if not 0.0 <= self.augment_translate <= 0.5:
            fail("augment_translate", "a number in [0, 0.5]")
        for name in ("ortho_lambda", "weight_decay"):
            if getattr(self, name) < 0:
                fail(name, "a number >= 0")
        for name in ("lr", "round_timeout", "discovery_timeout"):
            if getattr(self, name) <= 0:
                fail(name, "a number > 0")
        self.ema_decay_value  # raises on a bad value
        if not self.weathers:
            fail("synthetic_weathers", "a comma-separated list of weathers")
        try:
            get_strategy(self.strategy, self.strategy_options)
        except StrategyError as err:
            raise ConfigError(f"run-config strategy={self.strategy!r} strategy-options={self.strategy_options!r}: {err}") from None

    # -- derived values ----------------------------------------------------------------------------

    @property
    def ema_decay_value(self) -> float | str:
        """``"auto"`` or the decay as a float in (0, 1)."""
        try:
            return parse_ema_decay(self.ema_decay)
        except ValueError as err:
            raise ConfigError(f"run-config {err}") from None

    @property
    def weathers(self) -> list[str]:
        return [w.strip() for w in self.synthetic_weathers.split(",") if w.strip()]

    def federation_path(self) -> Path:
        """Absolute manifest path (relative ones under ``$FEDSTO_HOME``); accepts the folder too.

        A folder holding ``site.json`` and no ``federation.json`` is an exported server site.
        """
        path = Path(os.path.expanduser(self.federation))
        path = path if path.is_absolute() else fedsto_home() / path
        if path.suffix == ".json":
            return path
        if (path / "site.json").is_file() and not (path / "federation.json").is_file():
            return path / "site.json"
        return path / "federation.json"

    def run_dir(self) -> Path:
        """Absolute run directory: ``resume`` when given, else ``output_dir`` (relative: under ``$FEDSTO_HOME/runs``)."""
        if self.resume:
            return _absolute(self.resume, fedsto_home() / "runs")
        return _absolute(self.output_dir or f"{self.method}-{time.strftime('%Y%m%d-%H%M%S')}", fedsto_home() / "runs")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _absolute(path: str, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(annotation), None)
    if kind is None:
        raise TypeError(f"{key}: unsupported annotation {annotation}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config {key}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"run-config {key}={value!r}: expected an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config {key}={value!r}: expected a number")
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. ema-decay=0.999 given as a number
    if not isinstance(value, str):
        raise ConfigError(f"run-config {key}={value!r}: expected a string")
    return value

