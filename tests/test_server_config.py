"""The run config: pyproject defaults, presets, parsing errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def pyproject_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_holds_exactly_the_defaults():
    assert pyproject_config() == RunConfig().to_run_config()


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


def changed_value(cfg: RunConfig, name: str):
    """A valid value of knob ``name`` other than ``cfg``'s, found by type (no per-knob table to keep up)."""
    from dataclasses import fields

    from server.config import CHOICES

    kind = {f.name: f.type for f in fields(RunConfig)}[name]
    current = getattr(cfg, name)
    candidates = {"int": lambda: [current + 32], "float": lambda: [current / 2], "bool": lambda: [not current],
                  "str": lambda: [*CHOICES.get(name, ()), "auto", "strategies.fedavg:FedAvgStrategy", current + "-x", current + " "]}[kind]()
    for value in candidates:
        if value != current:
            try:
                cfg.replace(**{name: value})
                return value
            except ConfigError:
                pass
    raise AssertionError(f"no other valid value found for {name}")


def test_every_client_knob_reaches_the_round_instructions_and_back(tmp_path):
    """Adding a client knob is one field of ClientKnobs: it must travel without any other edit."""
    from flwr.app import ConfigRecord

    from server.plan import build_plan
    from server.rundir import RunDir
    from server.runner import FederatedRun
    from strategies.protocol import CLIENT_KNOBS, RoundInstructions

    cfg = RunConfig()
    cfg = cfg.replace(**{name: changed_value(cfg, name) for name in CLIENT_KNOBS})
    assert all(getattr(cfg, name) != getattr(RunConfig(), name) for name in CLIENT_KNOBS)
    run = FederatedRun(grid=None, cfg=cfg)
    run.manifest = "/data/federation.json"
    run.run_dir = RunDir(tmp_path / "run")
    step = next(s for s in build_plan("fedsto", 1, 1, 1).steps if s.phase_name == "phase2")
    sent = run.instructions(step, evaluate_personal=True)
    received = RoundInstructions.from_config(ConfigRecord(sent.to_config()))
    assert received == sent and received.run_key == run.run_dir.run_key
    assert {name: getattr(received, name) for name in CLIENT_KNOBS} == {name: getattr(cfg, name) for name in CLIENT_KNOBS}
    assert (received.server_round, received.phase, received.upload, received.ortho_lambda) == (
        2, "phase2", ("backbone", "neck", "head"), cfg.ortho_lambda)


def test_client_knobs_are_run_config_keys_with_pyproject_defaults():
    from strategies.protocol import CLIENT_KNOBS

    keys = pyproject_config()
    assert all(name.replace("_", "-") in keys for name in CLIENT_KNOBS)
