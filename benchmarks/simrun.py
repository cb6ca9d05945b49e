"""One real ``fedsto run`` (Flower's Ray simulation) under a memory monitor, for the scale benchmarks.

Memory is PSS (proportional set size) summed over every process the run starts: the local
SuperLink, the SuperExec, the simulation, Ray's daemons and its actors. RSS would count Ray's
shared object store and the shared libraries once per process. A process counts when it was
created after the monitor started; the benchmark itself is excluded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def process_kind(cmdline: list[str]) -> str:
    """A coarse label of a process of the simulation, for the memory breakdown."""
    text = " ".join(cmdline)
    if "ray::" in text or "default_worker.py" in text:
        return "ray actors"
    if any(name in text for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "ray/")):
        return "ray daemons"
    if "flower-superlink" in text or "flower-superexec" in text or "flwr-" in text:
        return "flower"
    return "other"


@dataclass
class PssMonitor:
    """Samples the summed PSS of the processes started after it, every ``interval`` seconds."""

    interval: float = 1.0
    peak: int = 0
    peak_breakdown: dict = field(default_factory=dict)
    peak_processes: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        self._t0 = time.time() - 0.5
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._own = os.getpid()

    def __enter__(self) -> "PssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        total, kinds, count = 0, {}, 0
        for proc in psutil.process_iter(["create_time", "cmdline"]):
            try:
                if proc.pid == self._own or (proc.info["create_time"] or 0) < self._t0:
                    continue
                pss = proc.memory_full_info().pss
            except (psutil.Error, OSError):
                continue
            kind = process_kind(proc.info["cmdline"] or [])
            kinds[kind] = kinds.get(kind, 0) + pss
            total += pss
            count += 1
        self.samples += 1
        if total > self.peak:
            self.peak, self.peak_breakdown, self.peak_processes = total, kinds, count

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def fedsto_run(preset: str, method: str, out: Path, clients: int, overrides: dict, port: int = 39391,
               log: Path | None = None, extra_flags: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``fedsto run`` to its end; (the finished process, wall seconds)."""
    from server.presets import toml_value

    command = [sys.executable, "-m", "server.cli", "run", "--preset", preset, "--method", method, "--out", str(out),
               "--clients", str(clients), "--port", str(port), "--quiet", *extra_flags, "--",
               *(f"{k}={toml_value(k, v)}" for k, v in overrides.items())]
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as sink:
        done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    return done, time.perf_counter() - t0


def read_rows(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def mib(value: float) -> float:
    return round(value / 2**20, 1)


def machine() -> dict:
    """What the figures were measured on."""
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def work_folder(name: str) -> Path:
    """``$FEDSTO_HOME/bench/<name>``: federations, run dirs and logs of a benchmark (never committed)."""
    from detection.ultralytics_env import fedsto_home

    folder = fedsto_home() / "bench" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def finish(console, module: str, argv: list[str] | None, result: dict, out: str | Path) -> int:
    """Print the command that measured ``result``, add it (with the machine and date) and write the JSON."""
    import shlex
    import time

    command = shlex.join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])
    console.print(f"measured by: {command}")
    result = {**result, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0
