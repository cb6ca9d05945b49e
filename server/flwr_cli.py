"""The ``flwr`` command line as functions: submit a run, read its status, follow its log, stop it.

``flwr run``'s exit status says nothing about how the run went, so :func:`run_verdict` trusts a
run only when its own ``result.json`` *and* ``flwr list`` both say completed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from detection.ultralytics_env import fedsto_home
from server import rundir as rd

RUNTIME_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


class LaunchError(RuntimeError):
    """Something that stops ``fedsto run`` before or around a run (message says what to do)."""


def executable(name: str) -> str:
    """A console script of this environment (next to ``sys.executable``), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise LaunchError(f"`{name}` not found next to {sys.executable} or on PATH (is flwr[simulation] installed?)")
    return found


def flwr_cmd(*args: str) -> list[str]:
    return [executable("flwr"), *args]


def flwr_env(flwr_home: Path, ports: tuple[int, int]) -> dict[str, str]:
    """Environment for ``flwr`` and the SuperLink: project-owned FLWR_HOME, no installs, no telemetry."""
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update({"FLWR_HOME": str(flwr_home), RUNTIME_INSTALL_ENV: "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
                "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]), "FEDSTO_HOME": str(fedsto_home()),
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONWARNINGS": "ignore::FutureWarning"})
    return env


def submit(app: Path, connection: str, config_file: Path, federation_config: str, env: Mapping[str, str]) -> int:
    """``flwr run`` -> run id (raises with flwr's own message on failure)."""
    proc = subprocess.run(flwr_cmd("run", str(app), connection, "--run-config", str(config_file),
                                   "--federation-config", federation_config, "--format", "json"),
                          env=dict(env), capture_output=True, text=True, cwd=str(app))
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    except (ValueError, json.JSONDecodeError):
        payload = {}
    if proc.returncode != 0 or not payload.get("success") or not payload.get("run-id"):
        raise LaunchError(f"flwr run failed (exit {proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}")
    return int(payload["run-id"])


def flwr_status(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    """``flwr list --run-id`` status text (``running``, ``finished:completed``, ...), "" if unknown."""
    proc = subprocess.run(flwr_cmd("list", connection, "--run-id", str(run_id), "--format", "json"), env=dict(env),
                          capture_output=True, text=True)
    try:
        runs = json.loads(proc.stdout[proc.stdout.index("{"):]).get("runs", [])
    except (ValueError, json.JSONDecodeError):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def flwr_stop(run_id: int, connection: str, env: Mapping[str, str], timeout: float = 30.0) -> bool:
    """``flwr stop``: ask the SuperLink to stop a run; True if the command succeeded in time."""
    try:
        proc = subprocess.run(flwr_cmd("stop", str(run_id), connection), env=dict(env), capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


class LogFollower:
    """``flwr log --stream`` in the background: lines printed and saved to a file."""

    def __init__(self, run_id: int, connection: str, env: Mapping[str, str], path: Path, console: Console | None) -> None:
        self.path = path
        self.proc = subprocess.Popen(flwr_cmd("log", str(run_id), connection, "--stream"), env=dict(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.thread = threading.Thread(target=self._pump, args=(console,), daemon=True)
        self.thread.start()

    def _pump(self, console: Console | None) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if console is not None:
                    console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.thread.join(5)


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session``); SIGKILL
    it if ``proc`` is still alive after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for_run(run_id: int, run_dir: Path, connection: str, env: Mapping[str, str], timeout: float | None,
                 label: str, console: Console, poll: float = 1.0, status_every: float = 15.0) -> str:
    """Wait until Flower reports the run finished; a rich bar follows ``progress.json``. Returns the status.

    The run directory is cheap to watch; ``flwr list`` starts a Python process per call, so it is
    asked only every ``status_every`` seconds (to notice a ServerApp that died without a word) and
    once the run directory says the run ended.
    """
    start = last_status = time.monotonic()
    progress_file = run_dir / rd.PROGRESS
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        while True:
            ended = False
            if progress_file.exists():
                try:
                    p = json.loads(progress_file.read_text())
                    bar.update(task, total=p["total"], completed=p["done"], description=f"{label}: {p['label']}")
                    ended = p.get("status") in ("completed", "failed")
                except (json.JSONDecodeError, KeyError, OSError):
                    pass
            if ended or time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                status = flwr_status(run_id, connection, env)
                if status.startswith("finished"):
                    return status
            if timeout and time.monotonic() - start > timeout:
                flwr_stop(run_id, connection, env)
                return "finished:timeout"
            time.sleep(poll)


def run_verdict(run_dir: Path, flwr_status_text: str) -> tuple[bool, str]:
    """A run succeeded only if its own ``result.json`` says completed *and* Flower says completed."""
    result = rd.RunDir(run_dir).read_json(rd.RESULT) if rd.holds_run(run_dir) else None
    own = (result or {}).get("status", "missing")
    if own == "completed" and flwr_status_text == "finished:completed":
        return True, "completed"
    reason = (result or {}).get("reason", "")
    return False, f"result.json: {own}{(' (' + reason + ')') if reason else ''}; flwr: {flwr_status_text or 'unknown'}"
