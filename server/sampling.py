"""Which clients train in a round: partition discovery and seeded sampling by partition id.

Flower's node ids are random per run and ``FedAvg`` samples them with ``random.sample``, so the
same seed would pick different clients each run. Here the server learns each node's partition id
once (a ``query.partition`` message) and samples *partition ids* with a generator seeded by
(seed, round): the same seed picks the same clients, whatever the node ids are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from detection.seeds import derive_seed
from server.exchange import send_and_receive
from strategies import protocol

log = logging.getLogger("fedsto.server")

# Fixed tags separate the sampling streams from the training streams derived from the same seed.
SAMPLING_STREAM = 0x5A3D
TEACHER_CHECK_STREAM = 0x7EAC


def sample_size(num_partitions: int, fraction: float) -> int:
    """Clients per round: ``round(fraction * n)``, at least one."""
    if num_partitions < 1:
        raise ValueError("no partitions to sample from")
    return min(num_partitions, max(1, int(round(fraction * num_partitions))))


def sample_partitions(partitions: Sequence[int], fraction: float, seed: int, server_round: int) -> list[int]:
    """The partitions that train in ``server_round``, sorted.

    Parameters
    ----------
    partitions : sequence of int
        Partition ids available (order does not matter).
    fraction : float
        Fraction of them to sample, in (0, 1].
    seed : int
        Run seed.
    server_round : int
        Global round number; each round draws independently.

    Returns
    -------
    list of int
        Sorted, without repetition; all of ``partitions`` when ``fraction`` is 1.
    """
    pool = sorted(set(int(p) for p in partitions))
    n = sample_size(len(pool), fraction)
    if n == len(pool):
        return pool
    rng = np.random.default_rng(derive_seed(seed, server_round, SAMPLING_STREAM))
    return sorted(int(p) for p in rng.choice(pool, size=n, replace=False))


def sample_teacher_check(partitions: Sequence[int], count: int, seed: int) -> list[int]:
    """The partitions whose teacher quality is checked before round 1: all (``count`` 0) or a seeded sample.

    With thousands of clients, inference on every one of them would cost more than a round; a
    sample of a few tens says as much about the warm-up.
    """
    pool = sorted(set(int(p) for p in partitions))
    if count <= 0 or count >= len(pool):
        return pool
    rng = np.random.default_rng(derive_seed(seed, TEACHER_CHECK_STREAM))
    return sorted(int(p) for p in rng.choice(pool, size=count, replace=False))


@dataclass
class Discovery:
    """Result of the partition query: node of each partition and what each client said about itself."""

    nodes: dict[int, int] = field(default_factory=dict)          # partition id -> node id
    info: dict[int, dict] = field(default_factory=dict)          # partition id -> {"domain", "images", ...}
    failures: list[str] = field(default_factory=list)

    @property
    def partitions(self) -> list[int]:
        return sorted(self.nodes)


def read_partition_reply(reply: Message) -> dict:
    """The ``info`` ConfigRecord of a partition-query reply as a plain dict."""
    record = reply.content.config_records.get(protocol.INFO)
    if record is None:
        raise KeyError(f"partition reply from node {reply.metadata.src_node_id} has no '{protocol.INFO}' record")
    return dict(record)


def discover_partitions(grid, expected: int, timeout: float, config: Mapping | None = None,
                        poll: float = 1.0, handshake: Mapping | None = None,
                        wanted: Collection[int] | None = None) -> Discovery:
    """Ask every connected node for its partition id, until the partitions ``wanted`` have answered.

    The discovery rule: each connected node gets one ``query.partition`` message (nodes that
    connect while waiting are asked as they come). Waiting ends as soon as every partition in
    ``wanted`` (the first client round's sample; default: all ``expected``) is mapped, when all
    ``expected`` nodes have been asked, or after ``timeout``. With 1,000 clients and 10 per round,
    round 1 therefore waits for its own 10, not for a fraction of all; partitions that connect
    later are asked before the round that samples them (``query_partitions``). Duplicate or
    out-of-range ids, error replies and sites whose handshake differs are recorded in
    ``failures``; so are ``wanted`` partitions still missing at the end.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    expected : int
        Number of clients in the federation.
    timeout : float
        Seconds to wait for nodes and replies together.
    config : mapping, optional
        Extra ConfigRecord entries for the query (e.g. the manifest path the server uses).
    poll : float
        Seconds between looks for newly connected nodes.
    handshake : mapping, optional
        What every site must report: ``protocol.FEDERATION_ID`` and the ``version-*`` keys of
        :func:`strategies.protocol.site_versions`; a site that differs is refused (see
        :func:`handshake_problem`).
    wanted : collection of int, optional
        The partitions the first client round needs.
    """
    wanted = set(range(expected)) if wanted is None else {int(p) for p in wanted}
    deadline = time.monotonic() + timeout
    found, asked, warned = Discovery(), set(), False
    while True:
        connected = set(grid.get_node_ids())
        new = sorted(connected - asked)
        if new:
            asked |= set(new)
            query_partitions(grid, new, found, expected, max(1.0, deadline - time.monotonic()), config, handshake,
                             connected=connected)
        missing = sorted(wanted - set(found.nodes))
        if not missing or len(asked) >= expected or time.monotonic() >= deadline:
            break
        if not warned:
            log.warning("%d of %d clients connected, partitions %s not yet among them; waiting up to %.0fs "
                        "(simulation: flwr run ... --federation-config 'num-supernodes=%d')",
                        len(connected), expected, _ids(missing), timeout, expected)
            warned = True
        time.sleep(poll)
    if missing and len(asked) < expected:  # (nodes that were asked and failed have failures of their own)
        found.failures.append(f"{len(asked)} of {expected} clients connected within {timeout:.0f}s; "
                              f"partitions {_ids(missing)} did not answer")
    return found


def _ids(partitions: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(p) for p in partitions[:limit])
    return shown + (f" and {len(partitions) - limit} more" if len(partitions) > limit else "")


def query_partitions(grid, node_ids, found: Discovery, expected: int, timeout: float, config: Mapping | None = None,
                     handshake: Mapping | None = None, connected: set[int] | frozenset = frozenset()) -> list[int]:
    """Send the partition query to ``node_ids`` and record the answers in ``found``.

    A partition already in ``found`` that answers from another node moves to that node (a site
    that restarted with a new node id), unless its node is still there: it answered this query
    or is among ``connected`` (then the newcomer is a second site with the same data, refused).
    Returns the partitions (re)mapped.
    """
    messages = [Message(RecordDict({protocol.CONFIG: ConfigRecord(dict(config or {}))}), dst_node_id=nid,
                        message_type=protocol.QUERY_PARTITION) for nid in sorted(node_ids)]
    replies = send_and_receive(grid, messages, timeout=timeout)
    answered, mapped = set(), []
    for reply in replies:
        nid = reply.metadata.src_node_id
        answered.add(nid)
        if reply.has_error():
            found.failures.append(f"node {nid}: partition query failed: {reply.error.reason}")
            continue
        info = read_partition_reply(reply)
        pid = int(info[protocol.PARTITION_ID])
        problem = handshake_problem(info, handshake) if handshake else None
        if not 0 <= pid < expected:
            found.failures.append(f"node {nid}: partition id {pid} outside 0..{expected - 1} of the federation")
        elif problem:
            found.failures.append(f"site client-{pid} (node {nid}) refused: {problem}")
        elif pid in found.nodes and found.nodes[pid] != nid and (found.nodes[pid] in answered or found.nodes[pid] in connected):
            found.failures.append(f"node {nid}: partition id {pid} already held by node {found.nodes[pid]}")
        else:
            found.nodes[pid] = nid
            found.info[pid] = info
            mapped.append(pid)
    for nid in set(node_ids) - answered:
        found.failures.append(f"node {nid}: no answer to the partition query")
    return mapped


def handshake_problem(info: Mapping, expected: Mapping) -> str | None:
    """Why a site's partition-query answer does not fit this server (None: it fits)."""
    problems = []
    theirs = info.get(protocol.FEDERATION_ID)
    if theirs != expected.get(protocol.FEDERATION_ID):
        problems.append(f"federation {theirs} there, {expected.get(protocol.FEDERATION_ID)} here "
                        "(its site folder comes from another federation)")
    versions = {k: v for k, v in expected.items() if k.startswith(protocol.VERSION_PREFIX)}
    problems += protocol.version_differences(versions, info)
    return "; ".join(problems) or None
