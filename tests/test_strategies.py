"""Strategy plug-ins: registry, aggregation (weighted, order-independent), merge, local keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies import FederatedStrategy, StrategyError, get_strategy, merge_states, sort_replies_by_partition
from strategies.base import LOCAL_STATE_KEY, aggregation_view
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


class KeepBatchNormLocal(FedAvgStrategy):
    """A FedBN-like plug-in as a user would write it: BatchNorm tensors never leave the client."""

    name = "test-fedbn"

    def local_keys(self, model):
        return [k for k in model.state_dict() if ".bn." in k]


def test_local_keys_plugin_point():
    from flwr.app import RecordDict

    from detection.model import build_model, get_state

    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", 3)
    strategy = KeepBatchNormLocal()
    upload = strategy.upload_keys(model, ["backbone", "neck", "head"])
    assert upload and not any(".bn." in k for k in upload)
    state = RecordDict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("bn.running_mean"):
                v.fill_(0.5)
    strategy.client_keep(model, state)
    assert LOCAL_STATE_KEY in state.array_records
    fresh = build_model("yolo11n.yaml", 3)
    broadcast = get_state(fresh)
    strategy.client_load(fresh, broadcast, state)  # local BN statistics win over the broadcast
    key = next(k for k in fresh.state_dict() if k.endswith("bn.running_mean"))
    assert torch.all(fresh.state_dict()[key] == 0.5)
    partial = {k: v for k, v in broadcast.items() if ".bn." not in k}
    strategy.client_load(build_model("yolo11n.yaml", 3), partial, state)  # BN from local state: complete
    with pytest.raises(KeyError, match="neither broadcast nor kept locally"):
        FedAvgStrategy().client_load(build_model("yolo11n.yaml", 3), partial, RecordDict())
