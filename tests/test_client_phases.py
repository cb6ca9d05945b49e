"""What travels and what trains, through the real ClientApp and ServerApp loop (in-process grid).

Phase 1: the client trains the backbone only (neck and head bit-identical, BatchNorm buffers
included) and uploads exactly the backbone. Phase 2: every group trains and travels, and the
orthogonality term is in the loss on both sides. The local EMA teacher starts from the round's
broadcast every round. A round with too few replies fails the run, visibly.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

import client.app
from detection.model import get_state, select_keys
from server.config import RunConfig
from server.inprocess import InProcessGrid
from server.rundir import RunDir
from server.runner import FederatedRun, RunFailed
from strategies.protocol import RoundInstructions
from strategies.transport import unpack_content

from helpers import without_timings

IMGSZ = 96


def instructions(federation, phase: str, **changes) -> RoundInstructions:
    groups = ("backbone",) if phase == "phase1" else ("backbone", "neck", "head")
    values = dict(server_round=1, phase=phase, trainable=groups, upload=groups, ortho_lambda=0.0 if phase == "phase1" else 1e-3,
                  ortho_form="srip", evaluate_personal=False, federation=str(federation), run_key="test-run", model="yolo11n.yaml", seed=0,
                  local_epochs=1, imgsz=IMGSZ, batch_size=8, lr=0.01, momentum=0.937, weight_decay=5e-4, ema_decay="auto",
                  tau_low=0.1, tau_high=0.6, nms_conf=0.1, nms_iou=0.65, pseudo_mode="soft", min_reliable_boxes=0)
    values.update(changes)
    return RoundInstructions(**values)


def fingerprint(state) -> str:
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def capture_client_model(monkeypatch):
    """The client's model right after local training (the ClientApp only returns the upload)."""
    captured = []
    real = client.app.train_round

    def spy(model, data, ins, extra, device):
        stats = real(model, data, ins, extra, device)
        captured.append(get_state(model))
        return stats

    monkeypatch.setattr(client.app, "train_round", spy)
    return captured


def test_phase1_client_trains_and_uploads_exactly_the_backbone(weather_federation, trained_detector, capture_client_model):
    model = trained_detector.model()
    broadcast = get_state(model)
    grid = InProcessGrid(client.app.app, 2)
    nid = next(n for n in grid.get_node_ids() if grid.partition_of(n) == 0)
    msg = Message(RecordDict({"arrays": ArrayRecord(broadcast),
                              "config": ConfigRecord(instructions(weather_federation, "phase1").to_config())}),
                  dst_node_id=nid, message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    backbone = select_keys(model, ["backbone"])
    uploaded = unpack_content(reply.content)["arrays"]  # the reply travels packed
    assert list(uploaded.keys()) == backbone

    after = capture_client_model[0]
    for k in select_keys(model, ["neck", "head"]):  # weights and BatchNorm buffers alike
        assert torch.equal(after[k], broadcast[k]), f"{k} changed in phase 1"
    changed = [k for k in backbone if after[k].is_floating_point() and not torch.equal(after[k], broadcast[k])]
    assert len(changed) > len(backbone) // 2, "the backbone did not train"
    for k in backbone:  # the upload is the trained backbone
        assert torch.equal(torch.from_numpy(uploaded[k].numpy()), after[k])

    share = sum(broadcast[k].numel() * broadcast[k].element_size() for k in backbone) / sum(
        v.numel() * v.element_size() for v in broadcast.values())
    sent_share = uploaded.count_bytes() / ArrayRecord(broadcast).count_bytes()
    assert abs(sent_share - share) <= 0.02 * share
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 25 and metrics["partition-id"] == 0
    assert metrics["pseudo_reliable"] > 0 and "loss_ortho" not in metrics
    assert 0 <= metrics["pseudo_reliable_precision"] <= 1


def run_config(federation, out, **changes) -> RunConfig:
    values = {"method": "fedsto", "federation": str(federation), "synthetic-images": 0, "imgsz": IMGSZ, "batch-size": 8,
              "warmup-epochs": 0, "phase1-rounds": 1, "phase2-rounds": 1, "eval-every": 1, "ema-decay": "auto",
              "ortho-lambda": 1e-3, "weak-teacher-map50": 0.0, "weak-teacher-density": 0.0, "output-dir": str(out),
              "progress": False, "server-threads": 2, "client-threads": 2}
    values.update(changes)
    return RunConfig.from_run_config(values)


@pytest.fixture
def warm_weights(trained_detector, tmp_path):
    path = tmp_path / "warm.pt"
    torch.save(trained_detector.state, path)
    return str(path)


@pytest.mark.slow
def test_fedsto_rounds_regulariser_both_sides_and_teacher_reset(weather_federation, warm_weights, tmp_path, monkeypatch):
    from detection import semi

    resets = []
    real_reset = semi.EmaTeacher.reset

    def spy_reset(self, source):
        real_reset(self, source)
        resets.append(fingerprint(self.model.state_dict()))

    monkeypatch.setattr(semi.EmaTeacher, "reset", spy_reset)
    grid = InProcessGrid(client.app.app, 2)
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights)
    result = FederatedRun(grid, cfg).run()
    assert result["status"] == "completed" and result["failures"] == 0
    rows = RunDir(tmp_path / "run").read_metrics()
    r1, r2 = rows
    assert (r1["phase"], r2["phase"]) == ("phase1", "phase2")
    # phase 1: no regulariser anywhere; phase 2: in the loss of the server and of every client
    assert "loss_ortho" not in r1["server"] and all("loss_ortho" not in c for c in r1["clients"].values())
    assert r2["server"]["loss_ortho"] > 0 and all(c["loss_ortho"] > 0 for c in r2["clients"].values())
    # bytes up: backbone only in phase 1, everything in phase 2
    assert r1["bytes_up"] < 0.7 * r2["bytes_up"] and r2["bytes_up"] == 2 * r2["bytes_model"]
    # the teacher of each client round starts exactly from that round's broadcast
    broadcasts = [fingerprint(unpack_content(m.content)["arrays"].to_torch_state_dict()) for m in grid.sent if m.metadata.message_type == "train"]
    assert len(broadcasts) == 4 and resets == broadcasts
    assert broadcasts[0] != broadcasts[2]  # and the broadcast did change between rounds
    # outputs of a finished run
    for name in ("model.pt", "results.md", "metrics.csv", "teacher_check.json", "plots/map_per_domain.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert "personalised" in (tmp_path / "run" / "results.md").read_text()


def test_too_few_replies_fail_the_run(weather_federation, warm_weights, tmp_path):
    grid = InProcessGrid(client.app.app, 2, fail=lambda pid, msg: pid == 1 and msg.metadata.message_type == "train")
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights, **{"phase2-rounds": 0, "eval-every": 5,
                                                                                   "eval-personal": False})
    with pytest.raises(RunFailed, match="1 of 2 clients replied"):
        FederatedRun(grid, cfg).run()
    run = RunDir(tmp_path / "run")
    result = run.read_json("result.json")
    assert result["status"] == "failed" and result["failures"] == 1
    (row,) = run.read_metrics()
    assert row["status"] == "failed" and row["failures"] == 1 and "injected client failure" in row["failure_reasons"][0]


@pytest.mark.slow
def test_half_the_replies_are_enough_when_allowed(weather_federation, warm_weights, tmp_path):
    grid = InProcessGrid(client.app.app, 2, fail=lambda pid, msg: pid == 1 and msg.metadata.message_type == "train")
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights,
                     **{"phase2-rounds": 0, "min-reply-fraction": 0.5, "eval-personal": False})
    result = FederatedRun(grid, cfg).run()
    assert result["status"] == "completed" and result["failures"] == 1 and result["failures_by_step"] == {"1": 1}


def test_round_one_needs_its_sampled_clients_and_names_the_missing(weather_federation, warm_weights, tmp_path):
    # Two clients in the federation, one node connected: round 1 samples both, so it cannot start.
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights, **{"discovery-timeout": 0.5})
    with pytest.raises(RunFailed, match=r"only 1 of the 2 clients round 1 samples answered.*partitions 1 did not answer"):
        FederatedRun(InProcessGrid(client.app.app, 1), cfg).run()


@pytest.mark.slow
def test_a_sampled_client_that_never_connects_is_a_failure_of_each_round(weather_federation, warm_weights, tmp_path):
    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights,
                     **{"discovery-timeout": 0.5, "min-reply-fraction": 0.5, "eval-personal": False})
    result = FederatedRun(InProcessGrid(client.app.app, 1), cfg).run()
    assert result["status"] == "completed" and result["failures_by_step"] == {"1": 1, "2": 1}
    assert all("partition 1: sampled, but no connected node" in f["reason"] for f in result["failure_reasons"])


@pytest.mark.slow
def test_a_message_whose_worker_died_is_sent_again_once(weather_federation, warm_weights, tmp_path):
    deaths = []

    def worker_dies_once(pid, msg):
        if pid == 1 and msg.metadata.message_type == "train" and not deaths:
            deaths.append(pid)
            raise RuntimeError("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task")
        return False

    cfg = run_config(weather_federation, tmp_path / "run", weights=warm_weights, **{"eval-personal": False})
    result = FederatedRun(InProcessGrid(client.app.app, 2, fail=worker_dies_once), cfg).run()
    assert deaths == [1]
    assert result["status"] == "completed" and result["failures"] == 0
    (death,) = result["site_failures"]
    assert "partition 1" in death["reason"] and "worker died" in death["reason"] and "ActorDiedError" in death["reason"]


class Crash(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the loop handles it."""


@pytest.mark.slow
def test_resume_after_a_crash_mid_round_gives_the_same_result(weather_federation, warm_weights, tmp_path):
    common = {"weights": warm_weights, "warmup-epochs": 1, "eval-personal": False}
    reference = FederatedRun(InProcessGrid(client.app.app, 2), run_config(weather_federation, tmp_path / "a", **common)).run()

    class CrashingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if any(m.metadata.message_type == "train" and m.content["config"]["server_round"] == 2 for m in messages):
                raise Crash()
            return super().send_and_receive(messages, timeout=timeout)

    with pytest.raises(Crash):
        FederatedRun(CrashingGrid(client.app.app, 2), run_config(weather_federation, tmp_path / "b", **common)).run()
    assert [r["step"] for r in RunDir(tmp_path / "b").read_metrics()] == [1, 2]
    resumed = FederatedRun(InProcessGrid(client.app.app, 2, seed=99),  # new node ids, as after a restart
                           run_config(weather_federation, tmp_path / "other", resume=str(tmp_path / "b"), **common)).run()
    assert resumed["final"] == reference["final"]
    a, b = RunDir(tmp_path / "a").read_metrics(), RunDir(tmp_path / "b").read_metrics()
    assert without_timings(a) == without_timings(b)
    ma, mb = (torch.load(p / "model.pt", weights_only=False)["model"].state_dict() for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
