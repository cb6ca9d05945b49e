"""Strategies as installed plug-ins: the worked example in ``examples/clipped-fedavg``.

The example is pip-installed (``--target`` a temporary folder, put on ``PYTHONPATH``, so the
test venv is left as it was) and then selected only by its name in the run config: ``fedsto
strategies`` lists it, its math holds, and a real Flower simulation (``fedsto run``, 2 rounds)
completes with it, as does one with ``strategy=fraug``. Nothing in ``server/``, ``client/`` or
``strategies/`` names it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_flower_integration import ROOT, home  # noqa: F401  (module fixture: FEDSTO_HOME and port)

EXAMPLE = ROOT / "examples" / "clipped-fedavg"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """Where ``pip install examples/clipped-fedavg`` put the example (a copy is built: no build/ in the repo)."""
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(EXAMPLE, work / "src")
    target = work / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(work / "src")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


def env_with(*paths: Path) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "250"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    return env


def fedsto(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_fedsto_strategies_lists_builtins_and_the_installed_plugin(plugin_path):
    proc = fedsto("strategies", env=env_with(plugin_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("fedavg", "fedbn", "fraug", "bulyan", "fedadam"):
        assert f"│ {name} " in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "clipped-fedavg" in line)
    assert "fedsto_clipped_fedavg:ClippedFedAvg" in row and "clip-norm=10.0" in row
    # and without the plug-in on the path it is not there
    assert "clipped-fedavg" not in fedsto("strategies", env=env_with()).stdout


def test_a_plugin_that_cannot_load_is_listed_with_its_error(tmp_path):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedsto.strategies]\nbroken = no_such_module:Nothing\n")
    proc = fedsto("strategies", env=env_with(tmp_path))
    assert proc.returncode == 1
    row = next(line for line in proc.stdout.splitlines() if "│ broken " in line)
    assert "cannot be loaded" in row and "no_such_module" in proc.stdout


def test_clipped_fedavg_math(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_path))
    from fedsto_clipped_fedavg import clip_by_norm, clipped_mean_step

    gen = torch.Generator().manual_seed(0)
    current = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen)}
    uploads = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in current.items()} for _ in range(4)]
    weights = [3.0, 1.0, 2.0, 4.0]
    # no clipping, server-lr 1: FedAvg exactly
    fedavg = {k: sum(w * u[k] for u, w in zip(uploads, weights)) / sum(weights) for k in current}
    plain = clipped_mean_step(current, uploads, weights, float("inf"), 1.0)
    assert all(torch.allclose(plain[k], fedavg[k], atol=1e-6) for k in current)
    # one upload scaled by 100: FedAvg is dragged far off, the clipped step moves at most server_lr * C
    poisoned = [dict(u) for u in uploads]
    poisoned[0] = {k: 100 * v for k, v in uploads[0].items()}

    def distance(a, b) -> float:
        return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))

    clip, lr = 0.5, 0.5
    assert distance(clipped_mean_step(current, poisoned, weights, float("inf"), 1.0), current) > 20
    assert distance(clipped_mean_step(current, poisoned, weights, clip, lr), current) <= lr * clip + 1e-5
    zero = {k: torch.zeros_like(v) for k, v in current.items()}
    assert abs(distance(clip_by_norm(poisoned[0], 2.0), zero) - 2.0) < 1e-5
    assert all(torch.equal(v, current[k]) for k, v in clip_by_norm(current, 1e9).items())


def read_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("strategy,options,extra_path", [("clipped-fedavg", "clip-norm=5 server-lr=0.5", True),
                                                         ("fraug", "", False)])
def test_real_simulation_selected_by_name(strategy, options, extra_path, plugin_path, home):  # noqa: F811
    """``fedsto run --preset smoke`` (SuperLink + Ray simulation, 2 rounds) with only ``strategy=NAME`` changed."""
    path, port = home
    out = path / "runs" / strategy
    proc = fedsto("run", "--preset", "smoke", "--method", "fedsto", "--out", out, "--port", port, "--quiet", "--",
                  f"strategy={strategy}", f'strategy-options="{options}"',
                  env=env_with(*([plugin_path] if extra_path else [])))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = read_result(out / "fedsto")
    assert result["status"] == "completed" and result["strategy"] == strategy and result["failures"] == 0
    rounds = [json.loads(line) for line in (out / "fedsto" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds if r.get("phase") in ("phase1", "phase2")] == ["phase1", "phase2"]
    assert all(r["replies"] == 2 for r in rounds if r.get("phase") in ("phase1", "phase2"))
    assert f"({strategy}(" in (out / "fedsto" / "server.log").read_text()
