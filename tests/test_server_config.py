"""The run config: pyproject defaults, presets, parsing errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.config import ConfigError, RunConfig, default_run_config

ROOT = Path(__file__).resolve().parents[1]


def pyproject_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_holds_exactly_the_defaults():
    assert pyproject_config() == default_run_config()


def test_paper_defaults():
    cfg = RunConfig.from_run_config(pyproject_config())
    assert (cfg.warmup_epochs, cfg.phase1_rounds, cfg.phase2_rounds, cfg.local_epochs) == (50, 100, 150, 1)
    assert (cfg.lr, cfg.tau_low, cfg.tau_high, cfg.nms_conf, cfg.nms_iou) == (0.01, 0.1, 0.6, 0.1, 0.65)
    assert cfg.ema_decay_value == 0.999


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "presets").glob("*.toml")))
def test_presets_are_valid_run_configs(preset):
    with (ROOT / "presets" / f"{preset}.toml").open("rb") as handle:
        values = tomllib.load(handle)
    assert set(values) <= set(pyproject_config()), "flwr run rejects keys missing from pyproject"
    RunConfig.from_run_config(values)


@pytest.mark.parametrize("values, match", [
    ({"method": "fedprox"}, "method"),
    ({"warmup-epochs": 2.5}, "warmup-epochs"),
    ({"lr": "fast"}, "lr"),
    ({"ema-decay": "1.5"}, "ema-decay"),
    ({"tau-low": 0.7, "tau-high": 0.6}, "tau-high"),
    ({"imgsz": 100}, "imgsz"),
    ({"fraction-train": 0.0}, "fraction-train"),
    ({"pseudo-mode": "hard"}, "pseudo-mode"),
    ({"eval-personal": "yes"}, "eval-personal"),
    ({"no-such-key": 1}, "no-such-key"),
])
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config(values)


def test_round_trip_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSTO_HOME", str(tmp_path))
    cfg = RunConfig.from_run_config({"ema-decay": "auto", "federation": "feds/a", "output-dir": "x", "seed": 3})
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert cfg.ema_decay_value == "auto"
    assert cfg.federation_path() == tmp_path / "feds/a/federation.json"
    assert cfg.run_dir() == tmp_path / "runs" / "x"
    absolute = RunConfig.from_run_config({"federation": "/data/f.json", "output-dir": "/out/r", "resume": "/out/old"})
    assert absolute.federation_path() == Path("/data/f.json")
    assert absolute.run_dir() == Path("/out/old")  # resume wins: the run continues in its own folder
