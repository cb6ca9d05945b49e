"""Real Flower runs (SuperLink + Ray simulation) of the smoke preset.

* every method through ``fedsto run`` (which wraps ``flwr run``): run directories complete,
  checkpoints kept, the final model loads in Ultralytics, results.md written;
* ``flwr run . local --run-config <toml>`` directly, twice with the same seed and two clients
  training in parallel: identical metrics and final weights;
* SIGKILL of the whole simulation mid-round, then ``resume=<run dir>`` on a fresh SuperLink: the
  same final metrics as the uninterrupted run.

All runs share one federation, one FEDSTO_HOME and one private SuperLink port (module scope).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from server.config import METHODS
from server.flwr_cli import flwr_status, submit
from server.plan import build_plan
from server.presets import write_run_config
from server.rundir import RunDir, holds_run
from server.superlink import LocalSuperLink, descendants, process_stat

from helpers import without_timings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 600


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", port + 2))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private FEDSTO_HOME (federation, runs, FLWR_HOME) and SuperLink port for this module."""
    path = tmp_path_factory.mktemp("fedsto-home")
    old = os.environ.get("FEDSTO_HOME")
    os.environ["FEDSTO_HOME"] = str(path)
    yield path, free_port_pair()
    if old is None:
        os.environ.pop("FEDSTO_HOME", None)
    else:
        os.environ["FEDSTO_HOME"] = old


@pytest.fixture(scope="module")
def smoke_runs(home):
    """All five methods of the smoke preset through ``fedsto run`` (one SuperLink, started and stopped by it)."""
    path, port = home
    out = path / "runs" / "smoke-all"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "run", "--preset", "smoke", "--method", ",".join(METHODS),
                           "--out", str(out), "--port", str(port), "--quiet"], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT * len(METHODS))
    return proc, out, time.monotonic() - t0


def smoke_config() -> dict:
    with (ROOT / "presets" / "smoke.toml").open("rb") as handle:
        return tomllib.load(handle)


def load_model_in_ultralytics(model_path: Path, image: Path, tmp: Path) -> str:
    """Load and predict with plain Ultralytics, in a process where this project is not importable."""
    code = ("import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]); r = m.predict(sys.argv[2], imgsz=64, "
            "verbose=False, device='cpu'); print('names', len(m.names), 'boxes', len(r[0].boxes))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp / "ultralytics-cfg")})
    proc = subprocess.run([sys.executable, "-c", code, str(model_path), str(image)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_smoke_preset_all_methods(smoke_runs, tmp_path):
    proc, out, seconds = smoke_runs
    print(f"fedsto run, 5 methods: {seconds:.0f}s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cfg = smoke_config()
    for method in METHODS:
        run = RunDir(out / method)
        result = run.read_json("result.json")
        assert result["status"] == "completed" and result["failures"] == 0, (method, result)
        plan = build_plan(method, cfg["warmup-epochs"], cfg["phase1-rounds"], cfg["phase2-rounds"], 1, cfg["eval-every"])
        rows = run.read_metrics()
        assert [r["step"] for r in rows] == [s.index for s in plan.steps]
        assert [r["phase"] for r in rows] == [s.phase_name for s in plan.steps]
        assert all(("clients" in r) == s.clients for r, s in zip(rows, plan.steps))
        assert set(rows[-1]["eval"]) == {"clear", "rainy", "night", "Total"}
        assert (run.path / "metrics.csv").read_text().count("\n") == len(rows) + 1
        ckpts = [p.name for p in run.checkpoint_paths()]
        assert ckpts == [f"step-{i:06d}.pt" for i in range(len(rows) - 1, len(rows) + 1)]  # keep-checkpoints = 2
        assert (run.path / "checkpoints" / "best.pt").exists()
        latest = run.latest_checkpoint()
        assert latest["step"] == len(rows) and latest["phase"] == rows[-1]["phase"] and "optimizer_state" in latest
        text = (run.path / "results.md").read_text()
        assert f"| {method} |" in text and "| clear | rainy | night | Total |" in text
        assert (run.path / "plots" / "map_per_domain.png").exists()
        if any(s.clients for s in plan.steps):
            assert json.loads((run.path / "teacher_check.json").read_text())["summary"]["clients"]
    fedsto = RunDir(out / "fedsto").read_metrics()
    p1, p2 = [r for r in fedsto if r["kind"] == "round"]
    assert 0.35 < p1["bytes_up"] / p2["bytes_up"] < 0.75  # backbone only in phase 1
    image = next((Path(os.environ["FEDSTO_HOME"]) / "federations" / "smoke" / "source" / "images").glob("*.png"))
    assert "names 5" in load_model_in_ultralytics(out / "fedsto" / "model.pt", image, tmp_path)
    assert "partial" in proc.stdout and "fedsto-st" in proc.stdout and "Total" in proc.stdout
    assert (out / "results.md").exists()


def direct_run(config: dict, link: LocalSuperLink, out: Path) -> int:
    """``flwr run <app> local --run-config <toml>``, as a user would type it; returns the run id."""
    toml = write_run_config(out.parent / f"{out.name}.toml", {**config, "output-dir": str(out)}, "integration test")
    return submit(ROOT, "local", toml, "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0", link.env)


def wait_finished(run_id: int, link: LocalSuperLink, timeout: float = RUN_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = flwr_status(run_id, "local", link.env)
        if status.startswith("finished"):
            return status
        time.sleep(3)
    raise TimeoutError(f"run {run_id} did not finish in {timeout}s")


def final_state(run: Path) -> dict:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=False)["model"].state_dict()


@pytest.mark.slow
def test_same_seed_same_result_and_resume_after_sigkill(smoke_runs, home):
    """Two parallel clients; the reference is the fedsto run of ``smoke_runs`` (same config, other folder)."""
    proc, out, _ = smoke_runs
    assert proc.returncode == 0, proc.stdout[-3000:]
    path, port = home
    reference = out / "fedsto"
    config = {k: v for k, v in tomllib.loads((out / "fedsto.run-config.toml").read_text()).items()}
    link = LocalSuperLink(path / "flwr", (port, port + 2))
    link.start()
    try:
        # same seed, again, straight through `flwr run`
        again = path / "runs" / "again"
        run_id = direct_run(config, link, again)
        assert wait_finished(run_id, link) == "finished:completed"
        assert RunDir(again).read_json("result.json")["status"] == "completed"
        a, b = RunDir(reference).read_metrics(), RunDir(again).read_metrics()
        assert without_timings(a) == without_timings(b)
        assert any(len(r.get("clients", {})) == 2 for r in b)
        sa, sb = final_state(reference), final_state(again)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

        # SIGKILL the whole simulation (ServerApp, SuperExec, Ray) as soon as the last step (the
        # phase-2 round) has started: progress.json says "2 done" before that step begins, and a
        # client round with evaluation takes seconds, so the kill lands inside it.
        killed = path / "runs" / "killed"
        run_id = direct_run(config, link, killed)
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            progress = RunDir(killed).read_json("progress.json") if holds_run(killed) else None
            if progress and progress["done"] >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached its last step")
        groups = {info[2] for pid in descendants(link.process.pid)
                  if "flwr-simulation" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                  and (info := process_stat(pid)) is not None}
        assert groups, "no flwr-simulation process found"
        for pgid in groups:
            os.killpg(pgid, signal.SIGKILL)
        assert [r["step"] for r in RunDir(killed).read_metrics()] == [1, 2]
        assert RunDir(killed).read_json("result.json") is None
    finally:
        link.stop()

    # a fresh SuperLink (its SuperExec died with the kill), then resume=<run dir>
    link = LocalSuperLink(path / "flwr", (port, port + 2))
    link.start()
    try:
        run_id = direct_run({**config, "resume": str(killed)}, link, path / "runs" / "resume-ignored")
        assert wait_finished(run_id, link) == "finished:completed"
    finally:
        link.stop()
    resumed = RunDir(killed)
    assert resumed.read_json("result.json")["status"] == "completed"
    assert without_timings(resumed.read_metrics()) == without_timings(RunDir(reference).read_metrics())
    sa, sk = final_state(reference), final_state(killed)
    assert all(torch.equal(sa[k], sk[k]) for k in sa)
    assert "resuming" in (killed / "server.log").read_text()


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes whose environment holds ``key=value`` (a run's SuperLink, SuperExec, simulation, Ray)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        info = process_stat(int(entry.name))
        if f"{key}={value}".encode() in environ and info is not None and info[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def test_ctrl_c_stops_the_run_and_resume_finishes_it(smoke_runs, home):
    """SIGINT mid-round: the Flower run and every process it started stop; --resume completes it."""
    proc, out, _ = smoke_runs
    assert proc.returncode == 0, proc.stdout[-3000:]
    path, port = home
    flwr_home = str(path / "flwr")
    interrupted = path / "runs" / "interrupted"
    run = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--preset", "smoke", "--method", "fedsto",
                            "--out", str(interrupted), "--port", str(port), "--quiet"], cwd=ROOT, env=dict(os.environ),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = interrupted / "fedsto"
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and run.poll() is None:
        progress = RunDir(run_dir).read_json("progress.json") if holds_run(run_dir) else None
        if progress and progress["done"] >= 1:  # the warm-up is done: round 1 (teacher check, clients) runs now
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the run never reached round 1: {run.communicate()[0][-3000:]}")
    started = processes_with_env("FLWR_HOME", flwr_home)
    assert len(started) >= 3, started  # SuperLink, SuperExec, flwr-simulation (and Ray)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130, output[-3000:]
    assert f"resume with: fedsto run --resume {run_dir}" in output
    deadline = time.monotonic() + 15
    while processes_with_env("FLWR_HOME", flwr_home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_env("FLWR_HOME", flwr_home) == []
    assert RunDir(run_dir).read_json("result.json") is None or RunDir(run_dir).read_json("result.json")["status"] != "completed"

    resumed = subprocess.run([sys.executable, "-m", "server.cli", "run", "--resume", str(run_dir), "--port", str(port),
                              "--quiet"], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert RunDir(run_dir).read_json("result.json")["status"] == "completed"
    assert without_timings(RunDir(run_dir).read_metrics()) == without_timings(RunDir(out / "fedsto").read_metrics())
