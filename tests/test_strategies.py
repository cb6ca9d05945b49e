"""Strategy plug-ins: registry, aggregation (weighted, order-independent), merge, local keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies import BUILTIN, FederatedStrategy, StrategyError, get_strategy, merge_states, sort_replies_by_partition
from strategies.base import RoundContext, aggregation_view, parse_options
from strategies.guard import check_reply, expected_specs
from strategies.fedavg import FedAvgStrategy


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reply(pid: int, tensors: dict, n: int, extra: dict | None = None) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=100 + pid, message_type="train")
    metrics = {"num-examples": n, "partition-id": pid, **(extra or {})}
    return Message(RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in tensors.items()}),
                               "metrics": MetricRecord(metrics)}), reply_to=request)


class MinusOne(FederatedStrategy):
    """Not a FedAvg: used to check dotted-path loading."""


def test_registry():
    assert isinstance(get_strategy("fedavg"), FedAvgStrategy)
    assert isinstance(get_strategy("FedAvg"), FedAvgStrategy)
    s = get_strategy("strategies.fedavg:FedAvgStrategy")
    assert type(s) is FedAvgStrategy
    with pytest.raises(StrategyError, match="unknown strategy"):
        get_strategy("fedbn-typo")
    with pytest.raises(StrategyError, match="cannot import"):
        get_strategy("no_such_pkg.mod:Thing")
    with pytest.raises(StrategyError, match="not a strategies.base.FederatedStrategy"):
        get_strategy("collections:OrderedDict")


def test_fedavg_weights_by_examples_and_ignores_diagnostics():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4, dtype=torch.int64)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8, dtype=torch.int64)}
    # diagnostics with different keys per client must not break Flower's consistency check
    replies = [reply(0, a, 1, {"loss_box": 0.5}), reply(1, b, 3, {"personal_map50": 0.2})]
    agg, _ = get_strategy("fedavg").aggregate(1, replies)
    assert torch.allclose(agg["w"], torch.tensor([2.5, 5.0]))
    assert float(agg["n"]) == pytest.approx(7.0)


def test_aggregation_is_independent_of_arrival_order():
    rng = np.random.default_rng(0)
    states = [{"w": torch.from_numpy(rng.standard_normal(1000).astype(np.float32))} for _ in range(5)]
    replies = [reply(pid, s, n) for pid, (s, n) in enumerate(zip(states, [7, 3, 11, 5, 2]))]
    strategy = get_strategy("fedavg")
    first, _ = strategy.aggregate(1, replies)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        again, _ = strategy.aggregate(1, [replies[i] for i in perm])
        assert torch.equal(first["w"], again["w"])  # bit-identical, not just close
    assert [int(m.content["metrics"]["partition-id"]) for m in sort_replies_by_partition(reversed(replies))] == [0, 1, 2, 3, 4]


def test_aggregation_view_keeps_only_arrays_and_weight():
    view = aggregation_view(reply(2, {"w": torch.zeros(2)}, 5, {"loss_cls": 1.0}))
    assert set(view.content.metric_records["metrics"].keys()) == {"num-examples", "partition-id"}
    assert list(view.content.array_records) == ["arrays"]


def test_merge_keeps_absent_keys_and_dtypes():
    glob = {"backbone.w": torch.zeros(3), "head.w": torch.ones(3), "bn.n": torch.tensor(5, dtype=torch.int64)}
    merged = merge_states(glob, {"backbone.w": torch.full((3,), 2.0, dtype=torch.float64), "bn.n": torch.tensor(6.6, dtype=torch.float64)})
    assert merged["head.w"] is glob["head.w"]
    assert merged["backbone.w"].dtype == torch.float32 and torch.equal(merged["backbone.w"], torch.full((3,), 2.0))
    assert merged["bn.n"].dtype == torch.int64 and int(merged["bn.n"]) == 7
    with pytest.raises(KeyError, match="keys the model does not have"):
        merge_states(glob, {"other": torch.zeros(1)})
    with pytest.raises(KeyError, match="shape"):
        merge_states(glob, {"head.w": torch.zeros(4)})


def test_fedbn_keeps_every_batchnorm_local_and_a_first_time_client_starts_from_the_broadcast():
    from detection.model import build_model, get_state

    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", 3)
    strategy = get_strategy("fedbn")
    local = strategy.local_keys(model)
    bn_modules = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(local) == 5 * len(bn_modules)  # weight, bias, running mean and var, batch counter
    upload = strategy.upload_keys(model, ["backbone", "neck", "head"])
    assert upload and not set(upload) & set(local)
    with torch.no_grad():
        for m in bn_modules:
            m.running_mean.fill_(0.5)
    saved = strategy.client_state(model)
    assert set(saved["model"]) == set(local)
    fresh, broadcast = build_model("yolo11n.yaml", 3), get_state(build_model("yolo11n.yaml", 3))
    strategy.client_load(fresh, broadcast, {}, saved)  # the node's own BatchNorm wins over the broadcast
    key = next(k for k in local if k.endswith("running_mean"))
    assert torch.all(fresh.state_dict()[key] == 0.5)
    first = build_model("yolo11n.yaml", 3)
    strategy.client_load(first, broadcast, {}, {})  # never trained before: the global BatchNorm
    assert torch.equal(first.state_dict()[key], broadcast[key])
    partial = {k: v for k, v in broadcast.items() if k not in local}
    with pytest.raises(KeyError, match="neither broadcast nor kept locally"):
        strategy.client_load(build_model("yolo11n.yaml", 3), partial, {}, {})


def test_options_parse_typed_and_refuse_unknown_names():
    assert get_strategy("fedprox", "proximal-mu=0.5").proximal_mu == 0.5
    s = get_strategy("fedadam", "eta=0.01, beta-1=0.5")
    assert (s.eta, s.beta_1, s.flower.eta) == (0.01, 0.5, 0.01)
    assert get_strategy("multikrum", "num-malicious-nodes=2 num-nodes-to-select=4").min_replies() == 7
    with pytest.raises(StrategyError, match="has no option 'mu'; it accepts: proximal-mu"):
        get_strategy("fedprox", "mu=1")
    with pytest.raises(StrategyError, match="expected float"):
        get_strategy("fedprox", "proximal-mu=lots")
    with pytest.raises(StrategyError, match="expected name=value"):
        parse_options("eta", get_strategy("fedadam").options, "fedadam")


def poisoned_round(seed=0, n=7, scale=100.0):
    rng = np.random.default_rng(seed)
    states = [{"w": torch.from_numpy(rng.normal(1.0, 0.1, 200).astype(np.float32)), "bn.n": torch.tensor(5)} for _ in range(n)]
    honest_mean = torch.stack([s["w"] for s in states[1:]]).mean(0)
    states[0] = {"w": states[0]["w"] * scale, "bn.n": torch.tensor(5)}
    return [reply(pid, s, 10) for pid, s in enumerate(states)], honest_mean


ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def test_robust_aggregators_resist_one_poisoned_reply_and_fedavg_does_not(record_measurement):
    replies, honest = poisoned_round()
    errors = {}
    for name in ("fedavg", *ROBUST):
        agg, _ = get_strategy(name).aggregate(1, replies)
        errors[name] = float((agg["w"] - honest).norm() / honest.norm())
    record_measurement("robust aggregation, |aggregate - honest mean| / |honest mean| with 7 replies, 1 scaled x100: "
                       + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    assert errors["fedavg"] > 10
    for name in ROBUST:
        assert errors[name] < 0.1, (name, errors[name])


def test_robust_aggregators_refuse_rounds_too_small_before_they_start():
    with pytest.raises(StrategyError, match=r"bulyan needs 7 replies per round \(4f\+3"):
        get_strategy("bulyan").check_round_size(3, 3)
    get_strategy("bulyan").check_round_size(7, 7)
    with pytest.raises(StrategyError, match="krum needs 5 replies"):
        get_strategy("krum").check_round_size(6, 4)


def test_server_optimisers_step_parameters_and_average_buffers():
    glob = {"w": torch.ones(200), "bn.running_var": torch.ones(200)}
    rng = np.random.default_rng(1)
    states = [{"w": torch.from_numpy(rng.normal(0.9, 0.01, 200).astype(np.float32)),
               "bn.running_var": torch.from_numpy(rng.uniform(0.5, 0.6, 200).astype(np.float32))} for _ in range(3)]
    replies = [reply(pid, s, 10) for pid, s in enumerate(states)]
    mean_var = torch.stack([s["bn.running_var"] for s in states]).mean(0)
    for name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        strategy = get_strategy(name)
        strategy.configure_round(RoundContext(1, glob, ["w", "bn.running_var"], frozenset({"w"}), 3))
        agg, _ = strategy.aggregate(1, replies)
        assert torch.allclose(agg["bn.running_var"], mean_var), name  # buffers: plain mean, never an Adam step
        assert bool((agg["w"] < 1).all()), name  # the step goes towards the clients
        assert strategy.state_dict(), name  # moments / momentum exist after a round
    adam = get_strategy("fedadam", "eta=0.01")
    adam.configure_round(RoundContext(1, glob, ["w"], frozenset({"w"}), 3))
    adam.aggregate(1, [reply(pid, {"w": s["w"]}, 10) for pid, s in enumerate(states)])
    # phase 2 brings new keys: their moments start at zero, the old key keeps its own
    glob2 = {"w": torch.ones(200), "v": torch.zeros(3)}
    adam.configure_round(RoundContext(2, glob2, ["w", "v"], frozenset({"w", "v"}), 3))
    m_before = adam.state_dict()["m_t"]["w"].copy()
    agg, _ = adam.aggregate(2, [reply(pid, {"w": s["w"], "v": torch.ones(3)}, 10) for pid, s in enumerate(states)])
    state = adam.state_dict()
    assert set(state["m_t"]) == {"w", "v"} and not np.array_equal(state["m_t"]["w"], m_before)
    assert np.allclose(state["m_t"]["v"], 0.1)  # a zero first moment after one step: (1 - beta_1) * delta
    assert bool((agg["v"] > 0).all() and (agg["v"] < 0.05).all())


def test_every_builtin_is_a_strategy_with_a_description():
    for name in BUILTIN:
        s = get_strategy(name)
        assert s.name == name and s.description, name


def test_the_guard_names_what_is_wrong():
    from flwr.app import ArrayRecord

    spec = expected_specs({"w": torch.zeros(2, 3), "n": torch.tensor(3)})
    good = {"w": torch.zeros(2, 3), "n": torch.tensor(3)}
    assert check_reply(ArrayRecord(good), 4.0, spec) is None
    assert "NaN/Inf" in check_reply(ArrayRecord({**good, "w": torch.full((2, 3), float("nan"))}), 4.0, spec)
    assert "NaN/Inf" in check_reply(ArrayRecord({**good, "w": torch.full((2, 3), float("inf"))}), 4.0, spec)
    assert "shape (3, 2), expected (2, 3)" in check_reply(ArrayRecord({**good, "w": torch.zeros(3, 2)}), 4.0, spec)
    assert "dtype float64" in check_reply(ArrayRecord({**good, "w": torch.zeros(2, 3, dtype=torch.float64)}), 4.0, spec)
    assert "1 missing" in check_reply(ArrayRecord({"w": good["w"]}), 4.0, spec)
    assert "1 unexpected" in check_reply(ArrayRecord({**good, "x": torch.zeros(1)}), 4.0, spec)
    for weight in (0.0, -3.0, float("nan")):
        assert "num-examples" in check_reply(ArrayRecord(good), weight, spec)
