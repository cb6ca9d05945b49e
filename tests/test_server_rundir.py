"""Run directory: metrics JSONL/CSV, checkpoints (last K + best, torn files), resume checks."""

from __future__ import annotations

import json

import pytest
import torch

from server.rundir import RunDir, RunDirError, config_differences, flatten


def test_create_refuses_existing_run_and_relative_path(tmp_path):
    RunDir.create(tmp_path / "r", {"run_config": {"seed": 0}})
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir.create(tmp_path / "r", {"run_config": {"seed": 0}})
    with pytest.raises(RunDirError, match="absolute"):
        RunDir("relative/run")


def test_metrics_rows_csv_and_truncate(tmp_path):
    run = RunDir.create(tmp_path / "r", {"run_config": {}})
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "eval": {"clear": {"map50": step / 10}}, "sampled": [0, 1]})
    with (run.path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "torn')  # a kill in the middle of a write
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    assert run.truncate_metrics(2) == 1
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    csv_text = (run.path / "metrics.csv").read_text().splitlines()
    assert csv_text[0].split(",") == ["step", "eval/clear/map50", "sampled"]
    assert len(csv_text) == 3
    assert flatten({"a": {"b": 1}, "c": [1, 2]}) == {"a/b": 1, "c": "[1, 2]"}


def test_checkpoints_keep_last_k_and_best(tmp_path):
    run = RunDir.create(tmp_path / "r", {"run_config": {}}, keep=2)
    for step in range(1, 6):
        run.save_checkpoint({"step": step, "w": torch.tensor([float(step)])}, step, is_best=step == 2)
    assert [p.name for p in run.checkpoint_paths()] == ["step-000004.pt", "step-000005.pt"]
    assert torch.load(run.path / "checkpoints" / "best.pt")["step"] == 2
    assert run.latest_checkpoint()["step"] == 5
    (run.path / "checkpoints" / "step-000006.pt").write_bytes(b"torn")  # killed while saving
    assert run.latest_checkpoint()["step"] == 5


def test_reopen_checks_the_config(tmp_path):
    cfg = {"seed": 0, "lr": 0.01, "output-dir": "/a", "resume": ""}
    RunDir.create(tmp_path / "r", {"run_config": cfg})
    RunDir.reopen(tmp_path / "r", {**cfg, "output-dir": "/b", "resume": str(tmp_path / "r")})
    with pytest.raises(RunDirError, match="lr: 0.01 -> 0.02"):
        RunDir.reopen(tmp_path / "r", {**cfg, "lr": 0.02})
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir.reopen(tmp_path / "nothing", cfg)
    assert config_differences({"a": 1, "progress": True}, {"a": 1, "progress": False}) == {}


def test_result_and_progress_files(tmp_path):
    run = RunDir.create(tmp_path / "r", {"run_config": {}})
    run.write_progress(3, 10, "round 1")
    run.write_result("failed", reason="round 2: 1 of 3 clients replied", failures=2)
    result = json.loads((run.path / "result.json").read_text())
    assert result["status"] == "failed" and result["failures"] == 2
    assert run.read_json("progress.json")["done"] == 3
