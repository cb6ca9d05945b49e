"""State that must outlast a round, a resume and a crash: FedBN's local BatchNorm, FedAdam's moments.

Through the real ServerApp loop and ClientApp on the in-process grid (two clients, one FedSTO
phase-1 round and one phase-2 round):

* FedBN: a client starts round 2 with exactly the BatchNorm it saved at the end of round 1 (not
  the broadcast's), and round 1, its first, with the broadcast's; no reply holds a BatchNorm
  tensor and the server keeps its own; the non-BatchNorm weights after aggregation, before the
  server epoch, are the example-weighted mean of the replies (weights made unequal); after a
  crash and a resume on new node ids, a client still starts round 2 with the BatchNorm it had
  saved.
* FedAdam: a crash at round 2 and a resume end with the metrics and weights of an uninterrupted
  run, because the moments are in the checkpoint; with ``load_state_dict`` disabled they do not.
"""

from __future__ import annotations

import pytest
import torch

import client.app
from client.node_state import NodeStateStore
from server.inprocess import InProcessGrid
from server.rundir import RunDir
from server.runner import FederatedRun
from strategies.fedbn import FedBNStrategy, batchnorm_keys
from strategies.fedopt import FedAdamStrategy
from strategies.transport import unpack_content

from helpers import without_timings
from test_client_phases import Crash, run_config, warm_weights  # noqa: F401  (fixture)

COMMON = {"eval-personal": False}


class RecordingGrid(InProcessGrid):
    """Keeps every train message sent and every train reply received.

    ``weight_scale`` multiplies a partition's reported ``num-examples`` (both clients hold 25
    images, so without it a plain mean and the example-weighted mean would be the same).
    """

    def __init__(self, *args, crash_at_round: int | None = None, weight_scale: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at_round = crash_at_round
        self.weight_scale = weight_scale or {}
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train and train[0].content["config"]["server_round"] == self.crash_at_round:
            raise Crash()  # stands in for SIGKILL: nothing in the loop handles it
        replies = super().send_and_receive(messages, timeout=timeout)
        if train:
            ok = [r for r in replies if not r.has_error()]
            for r in ok:
                metrics = r.content["metrics"]
                metrics["num-examples"] = metrics["num-examples"] * self.weight_scale.get(int(metrics["partition-id"]), 1.0)
            self.replies.append(ok)
        return replies


@pytest.fixture
def client_bn(monkeypatch):
    """``{(partition, round): (BatchNorm when training starts, BatchNorm when it ends)}`` of every client round."""
    seen = {}
    real = client.app.train_round

    def spy(model, data, ins, hook, device):
        keys = batchnorm_keys(model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
        stats = real(model, data, ins, hook, device)
        after = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
        seen[(data.partition_id, ins.server_round)] = (before, after)
        return stats

    monkeypatch.setattr(client.app, "train_round", spy)
    return seen


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def broadcast_bn(grid, server_round: int, keys) -> dict:
    msg = next(m for m in grid.sent if m.metadata.message_type == "train" and m.content["config"]["server_round"] == server_round)
    state = unpack_content(msg.content)["arrays"].to_torch_state_dict()
    return {k: state[k] for k in keys}


@pytest.mark.slow
def test_fedbn_keeps_each_clients_batchnorm_and_averages_the_rest(weather_federation, warm_weights, client_bn, tmp_path,
                                                                 monkeypatch):  # noqa: F811
    monkeypatch.setenv("FEDSTO_HOME", str(tmp_path / "home"))
    merges = []
    real_merge = FedBNStrategy.merge

    def spy_merge(self, global_state, aggregate):
        merged = real_merge(self, global_state, aggregate)
        merges.append((dict(global_state), dict(aggregate), merged))  # merged is the state before the server epoch
        return merged

    monkeypatch.setattr(FedBNStrategy, "merge", spy_merge)
    grid = RecordingGrid(client.app.app, 2, weight_scale={1: 3.0})
    run = FederatedRun(grid, run_config(weather_federation, tmp_path / "run", weights=warm_weights, strategy="fedbn", **COMMON))
    result = run.run()
    assert result["status"] == "completed" and result["failures"] == 0
    keys = batchnorm_keys(run.model)
    assert keys

    for pid in (0, 1):
        start_1, end_1 = client_bn[(pid, 1)]
        start_2, _ = client_bn[(pid, 2)]
        # first time sampled: the global BatchNorm (client_load alone: test_strategies.py::
        # test_fedbn_keeps_every_batchnorm_local_and_a_first_time_client_starts_from_the_broadcast)
        assert equal(start_1, broadcast_bn(grid, 1, keys))
        assert equal(start_2, end_1)  # round 2 starts from its own round-1 BatchNorm ...
        saved = NodeStateStore.for_node({}, run.run_dir.run_key, pid).load(before_round=2)["model"]
        assert equal(start_2, saved)  # ... which is what it saved on its disk
        assert not equal(start_2, broadcast_bn(grid, 2, keys))  # and not the broadcast's
    assert not equal(client_bn[(0, 2)][0], client_bn[(1, 2)][0])  # each client its own

    assert len(merges) == len(grid.replies) == 2
    for (global_state, aggregate, merged), replies in zip(merges, grid.replies):
        uploads = [unpack_content(r.content)["arrays"].to_torch_state_dict() for r in replies]
        weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
        assert weights[0] != weights[1]
        assert all(not set(keys) & set(u) for u in uploads)  # the server never receives a BatchNorm tensor
        assert equal({k: merged[k] for k in keys}, {k: global_state[k] for k in keys})  # and keeps its own
        assert set(aggregate) == set(uploads[0])
        for k in aggregate:
            mean = sum(w * u[k].double() for u, w in zip(uploads, weights)) / sum(weights)
            assert torch.allclose(merged[k].double(), mean.to(merged[k].dtype).double(), atol=1e-6), k


@pytest.mark.slow
def test_fedbn_batchnorm_survives_a_crash_and_resume(weather_federation, warm_weights, client_bn, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FEDSTO_HOME", str(tmp_path / "home"))
    cfg = dict(weights=warm_weights, strategy="fedbn", **COMMON)
    with pytest.raises(Crash):
        FederatedRun(RecordingGrid(client.app.app, 2, crash_at_round=2), run_config(weather_federation, tmp_path / "b", **cfg)).run()
    saved_end_1 = {pid: client_bn[(pid, 1)][1] for pid in (0, 1)}
    client_bn.clear()
    resumed = FederatedRun(RecordingGrid(client.app.app, 2, seed=99),  # new node ids, as after a restart
                           run_config(weather_federation, tmp_path / "other", resume=str(tmp_path / "b"), **cfg)).run()
    assert resumed["status"] == "completed"
    assert sorted(client_bn) == [(0, 2), (1, 2)]  # only round 2 was redone
    for pid in (0, 1):
        assert equal(client_bn[(pid, 2)][0], saved_end_1[pid])


@pytest.mark.slow
def test_fedadam_resume_after_a_crash_gives_the_same_result(weather_federation, warm_weights, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FEDSTO_HOME", str(tmp_path / "home"))
    cfg = dict(weights=warm_weights, strategy="fedadam", **{"strategy-options": "eta=0.001"}, **COMMON)

    def crash_then_resume(name: str):
        with pytest.raises(Crash):
            FederatedRun(RecordingGrid(client.app.app, 2, crash_at_round=2), run_config(weather_federation, tmp_path / name, **cfg)).run()
        checkpoint = RunDir(tmp_path / name).latest_checkpoint()
        resumed = FederatedRun(RecordingGrid(client.app.app, 2, seed=99),
                               run_config(weather_federation, tmp_path / "x", resume=str(tmp_path / name), **cfg)).run()
        model = torch.load(tmp_path / name / "model.pt", weights_only=False)["model"].state_dict()
        return checkpoint, resumed, model

    reference = FederatedRun(RecordingGrid(client.app.app, 2), run_config(weather_federation, tmp_path / "a", **cfg)).run()
    reference_model = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["model"].state_dict()

    checkpoint, resumed, model = crash_then_resume("b")
    moments = checkpoint["strategy_state"]
    assert len(moments["m_t"]) > 100 and any(abs(v).max() > 0 for v in moments["m_t"].values())  # round 1's moments
    assert resumed["final"] == reference["final"]
    assert without_timings(RunDir(tmp_path / "a").read_metrics()) == without_timings(RunDir(tmp_path / "b").read_metrics())
    assert all(torch.equal(reference_model[k], model[k]) for k in reference_model)

    # the same crash with the moments not restored (zero moments at round 2) ends elsewhere
    monkeypatch.setattr(FedAdamStrategy, "load_state_dict", lambda self, state: None)
    _, _, forgetful = crash_then_resume("c")
    assert not all(torch.equal(reference_model[k], forgetful[k]) for k in reference_model)
