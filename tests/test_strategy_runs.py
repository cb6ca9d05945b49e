"""Strategies through the real ServerApp loop and ClientApp (in-process grid): they complete under fedsto."""

from __future__ import annotations

import pytest

import client.app
from server.inprocess import InProcessGrid
from server.runner import FederatedRun, RunFailed

from test_client_phases import run_config, warm_weights  # noqa: F401  (fixture)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [("fedbn", ""), ("fraug", ""), ("fedadam", "eta=0.001"), ("fedprox", "proximal-mu=0.01")])
def test_strategy_completes_a_fedsto_run(strategy, options, weather_federation, warm_weights, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FEDSTO_HOME", str(tmp_path / "home"))
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights, strategy=strategy,
                     **{"strategy-options": options, "eval-personal": False})
    result = FederatedRun(InProcessGrid(client.app.app, 2), cfg).run()
    assert result["status"] == "completed" and result["failures"] == 0 and result["rejections"] == []
    assert result["final"]["Total"]["map50"] >= 0


def test_bulyan_with_two_clients_fails_before_round_one(weather_federation, warm_weights, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FEDSTO_HOME", str(tmp_path / "home"))
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights, strategy="bulyan")
    with pytest.raises(RunFailed, match=r"before round 1: strategy bulyan needs 7 replies per round"):
        FederatedRun(InProcessGrid(client.app.app, 2), cfg).run()
