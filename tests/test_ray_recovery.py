"""A simulated client's Ray actor killed mid-round: a new actor takes its place and the run goes on.

Real ``fedsto run`` (Flower's Ray simulation); the actor process running a client's message is
sent SIGKILL from outside, as the kernel's OOM killer would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.ray_recovery import worker_died
from test_flower_integration import free_port_pair

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_worker_death_is_told_from_a_clientapp_exception():
    assert worker_died("<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.'>")
    assert worker_died("ray.exceptions.RayActorError: The actor died because of an error raised in its creation task")
    assert not worker_died("<class 'flwr.clientapp.exception.ClientAppException'>:<'ValueError: bad batch'>")


def busy_actor() -> psutil.Process | None:
    """A Ray actor process of the simulation that is running a ClientApp message right now."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::ClientAppActor.run"):
            return proc
    return None


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_the_run_completes(tmp_path):
    env = {**os.environ, "FEDSTO_HOME": str(tmp_path / "home")}
    out, log = tmp_path / "runs", tmp_path / "run.log"
    command = [sys.executable, "-m", "server.cli", "run", "--preset", "smoke", "--method", "fedsto", "--out", str(out),
               "--port", str(free_port_pair()), "--quiet", "--", "phase2-rounds=2"]
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    progress, killed = out / "fedsto" / "progress.json", None
    try:
        deadline = time.monotonic() + 600
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            label = json.loads(progress.read_text())["label"] if progress.is_file() else ""
            actor = busy_actor() if label.startswith("round 1 ") else None
            if actor is not None:
                actor.send_signal(signal.SIGKILL)
                killed = actor.pid
            time.sleep(0.05)
        assert killed is not None, f"no busy actor seen in round 1; log:\n{log.read_text()[-3000:]}"
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    result = json.loads((out / "fedsto" / "result.json").read_text())
    assert result["status"] == "completed", result
    deaths = [f["reason"] for f in result["site_failures"] if "worker died" in f["reason"]]
    assert len(deaths) == 1, result["site_failures"]
    # Every round after the death got all its replies: the dead actor left the pool.
    rows = [json.loads(line) for line in (out / "fedsto" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("sampled")]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["failures"] == 0 and r["replies"] == len(r["sampled"]) for r in rounds), rounds
