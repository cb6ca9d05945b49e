"""A client's resources: per-node overrides of device, threads and batch, and CUDA out-of-memory handling.

There is no GPU here: the out-of-memory error is raised by a stand-in for the training call (the
real ``torch.cuda.OutOfMemoryError`` class), and the run goes through the real ServerApp loop and
ClientApp on the in-process grid.
"""

from __future__ import annotations

import json

import pytest
import torch

import client.app
from client.task import NodeConfigError, with_node_overrides
from server.runner import FederatedRun, RunFailed
from strategies.protocol import RoundInstructions

from test_client_phases import run_config, warm_weights  # noqa: F401  (fixture)
from test_strategy_state import RecordingGrid


def instructions(**changes) -> RoundInstructions:
    from server.config import RunConfig

    cfg = RunConfig.from_run_config({"synthetic-images": 0, **changes})
    return RoundInstructions.for_round(cfg, server_round=1, phase="phase1", trainable=("backbone",), upload=("backbone",),
                                       ortho_lambda=0.0, evaluate_personal=False, federation="f", run_key="k")


def test_node_config_overrides_device_threads_and_batch():
    ins = instructions(**{"batch-size": 16, "client-threads": 0})
    assert with_node_overrides(ins, {"partition-id": 0}) is ins
    mine = with_node_overrides(ins, {"device": "cuda:1", "threads": 3, "batch-size": 4})
    assert (mine.device, mine.client_threads, mine.batch_size) == ("cuda:1", 3, 4)
    for bad in ({"batch-size": 0}, {"threads": "two"}, {"device": ""}, {"batch-size": True}):
        with pytest.raises(NodeConfigError, match=next(iter(bad))):
            with_node_overrides(ins, bad)


@pytest.fixture
def oom_on_partition_1(monkeypatch):
    """Partition 1's first training call runs out of CUDA memory; the batch size of every call is kept."""
    calls = []
    real = client.app.train_round

    def train_round(model, site, ins, hook, device):
        calls.append((site.partition_id, ins.server_round, ins.batch_size))
        if site.partition_id == 1 and [c[0] for c in calls].count(1) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, site, ins, hook, device)

    monkeypatch.setattr(client.app, "train_round", train_round)
    return calls


@pytest.mark.slow
def test_out_of_memory_is_retried_once_at_half_the_batch(weather_federation, warm_weights, oom_on_partition_1, tmp_path):  # noqa: F811
    grid = RecordingGrid(client.app.app, 2)
    cfg = run_config(weather_federation, tmp_path / "a", weights=warm_weights, **{"phase2-rounds": 0, "eval-personal": False})
    result = FederatedRun(grid, cfg).run()
    assert result["status"] == "completed" and result["failures"] == 0
    assert oom_on_partition_1 == [(0, 1, 8), (1, 1, 8), (1, 1, 4)]
    retried = {int(r.content["metrics"]["partition-id"]): r.content["metrics"]["oom_batch_size"] for r in grid.replies[0]}
    assert retried == {0: 0.0, 1: 4.0}


@pytest.mark.slow
def test_out_of_memory_without_retry_fails_the_round_naming_batch_and_partition(weather_federation, warm_weights,  # noqa: F811
                                                                                 oom_on_partition_1, tmp_path):
    cfg = run_config(weather_federation, tmp_path / "b", weights=warm_weights,
                     **{"phase2-rounds": 0, "eval-personal": False, "oom-retry": False})
    with pytest.raises(RunFailed):
        FederatedRun(RecordingGrid(client.app.app, 2), cfg).run()
    reasons = json.loads((tmp_path / "b" / "result.json").read_text())["failure_reasons"]
    assert any("partition 1: CUDA out of memory at batch 8" in f["reason"] for f in reasons), reasons
