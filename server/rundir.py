"""The run directory: resolved config, per-step metrics (JSONL + CSV), checkpoints, result, progress.

Layout::

    <run>/config.json          resolved run config (+ plan, federation, versions)
    <run>/metrics.jsonl        one JSON object per step (warm-up epoch or round)
    <run>/metrics.csv          the same, flattened (regenerated after each step)
    <run>/checkpoints/step-000012.pt   last K checkpoints; best.pt (highest Total mAP50)
    <run>/teacher_check.json   warm-up quality check (written once, before round 1)
    <run>/progress.json        {"done", "total", "label", "status"} for front ends
    <run>/model.pt             final model, loadable by ultralytics.YOLO
    <run>/results.md, plots/   report (server.report)
    <run>/result.json          {"status": "completed"|"failed", "failures": ..., ...}

Checkpoints are written after the step's metrics row, atomically; on resume rows after the
checkpoint's step are dropped, so a SIGKILL anywhere leaves a consistent directory.
"""

from __future__ import annotations

import csv
import io
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from detection.atomic import atomic_write, atomic_write_text

CONFIG = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
RESULT = "result.json"
PROGRESS = "progress.json"
TEACHER_CHECK = "teacher_check.json"
CHECKPOINTS = "checkpoints"
BEST = "best.pt"
MODEL = "model.pt"

# Run-config keys that may differ when resuming (they do not change what is computed).
RESUME_MAY_DIFFER = frozenset({"resume", "output-dir", "progress", "round-timeout", "discovery-timeout",
                               "tensorboard", "mlflow", "device"})


class RunDirError(RuntimeError):
    """A run directory that cannot be created or resumed as asked."""


def holds_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (its ``config.json`` is written first, when the run starts)."""
    return (Path(path) / CONFIG).exists()


def flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a/b/c`` columns; lists as JSON text."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: Iterable[str] = RESUME_MAY_DIFFER) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two run configs (``(saved, current)``), ignoring some."""
    ignore = set(ignore)
    keys = (set(saved) | set(current)) - ignore
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}


class RunDir:
    """One run's directory (see the module docstring).

    Parameters
    ----------
    path : Path
        Absolute directory.
    keep : int
        Regular checkpoints to keep (``best.pt`` is kept in addition).
    """

    def __init__(self, path: str | os.PathLike, keep: int = 2) -> None:
        self.path = Path(path)
        if not self.path.is_absolute():
            raise RunDirError(f"run directory {path} must be absolute (the ServerApp's cwd is the SuperLink's)")
        self.keep = int(keep)

    @property
    def run_key(self) -> str:
        """The project's id of this run: the folder's name and a hash of its path (the same on resume).

        Clients key their saved local state by it (``client.node_state``); Flower's run id cannot
        serve, as every ``flwr run`` (a resume included) gets a new one.
        """
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:10]
        return f"{self.path.name}-{digest}"

    # -- creation / resume -----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, config: Mapping[str, Any], keep: int = 2) -> "RunDir":
        """A fresh run directory; refuses one that already holds a run."""
        run = cls(path, keep)
        if holds_run(run.path):
            raise RunDirError(f"{run.path} already holds a run ({CONFIG} exists); pass resume={run.path} to continue it "
                              "or choose another output-dir")
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / CHECKPOINTS).mkdir(exist_ok=True)
        atomic_write_text(run.path / CONFIG, json.dumps(dict(config), indent=2, default=str) + "\n")
        return run

    @classmethod
    def reopen(cls, path: str | os.PathLike, run_config: Mapping[str, Any], keep: int = 2) -> "RunDir":
        """An existing run directory to resume; its run config must match the current one."""
        run = cls(path, keep)
        if not holds_run(run.path):
            raise RunDirError(f"resume={run.path}: no {CONFIG} there (not a run directory)")
        saved = run.config().get("run_config", {})
        diff = config_differences(saved, run_config)
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise RunDirError(f"resume={run.path}: the run config differs from the one it was started with ({lines})")
        (run.path / CHECKPOINTS).mkdir(exist_ok=True)
        return run

    def config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text(encoding="utf-8"))

    # -- metrics ---------------------------------------------------------------------------------

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one step's row to the JSONL (flushed and fsynced) and regenerate the CSV."""
        with (self.path / METRICS_JSONL).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.write_csv()

    def read_metrics(self) -> list[dict]:
        path = self.path / METRICS_JSONL
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line after a kill: everything before it is intact
        return rows

    def truncate_metrics(self, last_step: int) -> int:
        """Keep only rows of steps <= ``last_step`` (a resumed run redoes the others). Returns rows dropped."""
        rows = self.read_metrics()
        kept = [r for r in rows if int(r.get("step", 0)) <= last_step]
        text = "".join(json.dumps(r, default=_json_default) + "\n" for r in kept)
        atomic_write_text(self.path / METRICS_JSONL, text)
        self.write_csv()
        return len(rows) - len(kept)

    def write_csv(self) -> None:
        rows = [flatten(r) for r in self.read_metrics()]
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / METRICS_CSV, buffer.getvalue())

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_paths(self) -> list[Path]:
        """Regular checkpoints, oldest first."""
        return sorted((self.path / CHECKPOINTS).glob("step-*.pt"))

    def save_checkpoint(self, payload: Mapping[str, Any], step: int, is_best: bool = False) -> Path:
        """Write ``checkpoints/step-NNNNNN.pt`` atomically, copy it to ``best.pt`` if best, keep the last K."""
        folder = self.path / CHECKPOINTS
        folder.mkdir(exist_ok=True)
        path = atomic_write(folder / f"step-{step:06d}.pt", lambda tmp: torch.save(dict(payload), tmp))
        if is_best:
            atomic_write(folder / BEST, lambda tmp: shutil.copyfile(path, tmp))
        for old in self.checkpoint_paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> dict | None:
        """The newest loadable checkpoint (a torn one from a kill is skipped), or None."""
        for path in reversed(self.checkpoint_paths()):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001  (a partially written file: fall back to the previous one)
                continue
        return None

    # -- status files ----------------------------------------------------------------------------

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(dict(data), indent=2, default=_json_default) + "\n")
        return path

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write_progress(self, done: int, total: int, label: str, status: str = "running") -> None:
        self.write_json(PROGRESS, {"done": done, "total": total, "label": label, "status": status, "time": time.time()})

    def write_result(self, status: str, **fields: Any) -> Path:
        """``result.json``: the run's own verdict (``flwr run``'s exit code is not trusted)."""
        return self.write_json(RESULT, {"status": status, "time": time.time(), **fields})


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class OptionalLoggers:
    """TensorBoard and MLflow sinks, each used only when asked for and installed (quietly skipped otherwise)."""

    def __init__(self, run_dir: Path, tensorboard: bool, mlflow: bool, run_name: str, params: Mapping[str, Any]) -> None:
        self.notes: list[str] = []
        self.tb = None
        self.mlflow = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.notes.append("tensorboard requested but not installed (pip install 'fedsto[tensorboard]'): skipped")
        if mlflow:
            try:
                import mlflow as _mlflow

                _mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
                _mlflow.set_experiment("fedsto")
                _mlflow.start_run(run_name=run_name)
                _mlflow.log_params({k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))})
                self.mlflow = _mlflow
            except ImportError:
                self.notes.append("mlflow requested but not installed (pip install 'fedsto[mlflow]'): skipped")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
