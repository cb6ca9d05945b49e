"""The warm-up is trained once: later runs and other methods reuse it and end with the same numbers."""

from __future__ import annotations

import pytest
import torch

import client.app
import detection.train
from server.inprocess import InProcessGrid
from server.rundir import RunDir
from server.runner import FederatedRun
from server.warmup_cache import warmup_key

from helpers import without_timings
from test_client_phases import run_config

WARMUP = {"warmup-epochs": 2, "warmup-lr-steps": 4, "eval-personal": False}


def entries(home) -> list[str]:
    return sorted(p.name for p in (home / "warmups").iterdir()) if (home / "warmups").is_dir() else []


def metrics(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "method"} for row in without_timings(RunDir(out).read_metrics())]


def final_weights(out) -> dict:
    return torch.load(out / "model.pt", weights_only=False)["model"].state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_warmup_trained_by_partial_is_reused_by_fedsto_with_identical_results(weather_federation, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FEDSTO_HOME", str(home))

    def run(name: str, method: str, **changes) -> dict:
        cfg = run_config(weather_federation, tmp_path / name, method=method, **{**WARMUP, **changes})
        return FederatedRun(InProcessGrid(client.app.app, 2), cfg).run()

    reference = run("fedsto-uncached", "fedsto", **{"warmup-cache": False})
    assert entries(home) == [] and reference["warmup_cache"]["reused"] is False

    stored = run("partial", "partial")  # trains the warm-up and stores it
    assert len(entries(home)) == 1 and stored["warmup_cache"]["reused"] is False
    reused = run("fedsto-cached", "fedsto")
    assert reused["warmup_cache"] == {"key": stored["warmup_cache"]["key"], "reused": True}
    assert len(entries(home)) == 1
    assert metrics(tmp_path / "fedsto-cached") == metrics(tmp_path / "fedsto-uncached")
    assert same_weights(final_weights(tmp_path / "fedsto-cached"), final_weights(tmp_path / "fedsto-uncached"))
    assert without_timings(reused["final"]) == without_timings(reference["final"])
    # the partial run's own warm-up rows are the ones the fedsto run reused
    assert [r for r in metrics(tmp_path / "partial") if r["kind"] == "warmup"] == \
        [r for r in metrics(tmp_path / "fedsto-cached") if r["kind"] == "warmup"]

    # a changed warm-up setting trains (and stores) a warm-up of its own
    changed = run("partial-lr", "partial", **{"warmup-lr-steps": 2})
    assert changed["warmup_cache"]["reused"] is False and len(entries(home)) == 2


def test_the_key_follows_what_decides_the_warmup_and_nothing_else(weather_federation, tmp_path, monkeypatch):
    def key(**changes) -> str:
        return warmup_key(run_config(weather_federation, tmp_path, **{**WARMUP, **changes}), weather_federation, "server", "cpu")[0]

    base = key()
    # what decides the warm-up
    for change in ({"warmup-epochs": 3}, {"warmup-lr-steps": 5}, {"lr": 0.02}, {"batch-size": 4}, {"imgsz": 64},
                   {"augment-scale": 0.3}, {"augment-translate": 0.0}, {"server-augment": "standard"}, {"seed": 1},
                   {"momentum": 0.9}, {"weight-decay": 0.0}, {"model": "yolov8n.yaml"}):
        assert key(**change) != base, change
    assert warmup_key(run_config(weather_federation, tmp_path, **WARMUP), weather_federation, "all", "cpu")[0] != base
    assert warmup_key(run_config(weather_federation, tmp_path, **WARMUP), weather_federation, "server", "cuda:1")[0] != base
    # what happens after it
    for change in ({"method": "partial"}, {"phase1-rounds": 7}, {"ortho-lambda": 0.5}, {"eval-every": 3},
                   {"tau-high": 0.7}, {"output-dir": str(tmp_path / "elsewhere")}, {"strategy": "fedbn"}):
        assert key(**change) == base, change
    # a new recipe version
    monkeypatch.setattr("server.warmup_cache.RECIPE_VERSION", detection.train.RECIPE_VERSION + 1)
    assert key() != base


@pytest.mark.slow
def test_a_longer_warmup_continues_a_stored_shorter_one_and_ends_where_a_straight_one_does(weather_federation, tmp_path,
                                                                                            monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FEDSTO_HOME", str(home))

    def run(name: str, epochs: int, **changes) -> dict:
        cfg = run_config(weather_federation, tmp_path / name, method="partial",
                         **{**WARMUP, "warmup-epochs": epochs, "phase1-rounds": 0, "phase2-rounds": 1, **changes})
        return FederatedRun(InProcessGrid(client.app.app, 2), cfg).run()

    straight = run("straight", 3, **{"warmup-cache": False})
    run("short", 2)
    assert len(entries(home)) == 1
    extended = run("extended", 3)  # epochs 1-2 from the stored 2-epoch warm-up, epoch 3 trained here
    assert len(entries(home)) == 2  # ... and the 3-epoch warm-up stored under its own key
    assert same_weights(final_weights(tmp_path / "extended"), final_weights(tmp_path / "straight"))
    assert without_timings(extended["final"]) == without_timings(straight["final"])
    warmup_rows = [r for r in metrics(tmp_path / "extended") if r["kind"] == "warmup"]
    assert [r["step"] for r in warmup_rows] == [1, 2, 3]
    assert run("again", 3)["warmup_cache"]["reused"] is True and len(entries(home)) == 2
