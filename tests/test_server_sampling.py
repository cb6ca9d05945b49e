"""Deterministic client sampling by partition id, and partition discovery over a Grid."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from server.inprocess import InProcessGrid
from server.sampling import discover_partitions, sample_partitions, sample_size, sample_teacher_check


def test_sampling_is_seeded_by_partition_not_order():
    pids = list(range(20))
    a = sample_partitions(pids, 0.3, seed=7, server_round=3)
    assert a == sample_partitions(list(reversed(pids)), 0.3, seed=7, server_round=3)
    assert len(a) == 6 and a == sorted(set(a))
    assert a != sample_partitions(pids, 0.3, seed=8, server_round=3)
    rounds = {tuple(sample_partitions(pids, 0.3, seed=7, server_round=r)) for r in range(1, 11)}
    assert len(rounds) > 5  # rounds draw independently


def test_teacher_check_sample_is_all_or_a_seeded_subset():
    pids = list(range(100))
    assert sample_teacher_check(pids, 0, seed=1) == pids
    assert sample_teacher_check(pids[:5], 10, seed=1) == pids[:5]
    sample = sample_teacher_check(pids, 8, seed=1)
    assert len(sample) == 8 and sample == sorted(set(sample)) and set(sample) <= set(pids)
    assert sample == sample_teacher_check(list(reversed(pids)), 8, seed=1)
    assert sample != sample_teacher_check(pids, 8, seed=2)


def test_sampling_edges():
    assert sample_partitions([3, 1, 2], 1.0, 0, 1) == [1, 2, 3]
    assert sample_size(10, 0.01) == 1
    assert sample_size(3, 0.5) == 2
    with pytest.raises(ValueError):
        sample_size(0, 1.0)


def _echo_app(bad_pid: int | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("partition")
    def query(msg, context):
        pid = int(context.node_config["partition-id"])
        if pid == bad_pid:
            raise RuntimeError("no data here")
        return Message(RecordDict({"info": ConfigRecord({"partition-id": pid, "domain": f"d{pid}", "images": 10})}),
                       reply_to=msg)

    return app


def test_discovery_maps_partitions_to_random_node_ids():
    grid = InProcessGrid(_echo_app(), 4, seed=3)
    found = discover_partitions(grid, expected=4, timeout=5)
    assert found.failures == []
    assert found.partitions == [0, 1, 2, 3]
    for pid, nid in found.nodes.items():
        assert grid.partition_of(nid) == pid
    assert found.info[2]["domain"] == "d2"


def test_discovery_reports_failures_and_missing_nodes():
    grid = InProcessGrid(_echo_app(bad_pid=1), 3)
    found = discover_partitions(grid, expected=4, timeout=0.1, poll=0.05)
    assert found.partitions == [0, 2]
    assert any("3 of 4 clients connected" in f and "partitions 1, 3 did not answer" in f for f in found.failures)
    assert any("no data here" in f for f in found.failures)


def test_discovery_waits_for_the_first_rounds_sample_not_for_every_client():
    import time

    # 1,000 clients in the federation, 12 connected: round 1 samples partitions 2 and 5, so the
    # query of the 12 is enough and nothing waits for the other 988.
    grid = InProcessGrid(_echo_app(), 12, seed=1)
    t0 = time.monotonic()
    found = discover_partitions(grid, expected=1000, timeout=30, poll=0.05, wanted=[2, 5])
    assert time.monotonic() - t0 < 15
    assert found.partitions == list(range(12)) and found.failures == []
    # A wanted partition that never connects is waited for until the timeout, then named.
    found = discover_partitions(grid, expected=1000, timeout=0.3, poll=0.05, wanted=[2, 500])
    assert found.partitions == list(range(12))
    assert len(found.failures) == 1 and "partitions 500 did not answer" in found.failures[0]


def test_a_site_back_with_a_new_node_id_takes_its_partition_but_a_second_copy_does_not():
    from server.sampling import query_partitions

    grid = InProcessGrid(_echo_app(), 3, seed=5)
    found = discover_partitions(grid, expected=3, timeout=5)
    old = found.nodes[1]
    # A second node with partition 1's data while partition 1's node is still connected: refused.
    grid.contexts[777] = grid.contexts[old]
    grid.partitions[777] = 1
    assert query_partitions(grid, [777], found, 3, 5, connected=set(grid.get_node_ids())) == []
    assert found.nodes[1] == old and "partition id 1 already held by node" in found.failures[-1]
    # Partition 1's node gone (restarted without node auth: a new id): the newcomer takes over.
    del grid.contexts[old], grid.partitions[old]
    assert query_partitions(grid, [777], found, 3, 5, connected=set(grid.get_node_ids())) == [1]
    assert found.nodes[1] == 777
