"""Pure helpers of a federated round: reply classification, byte counts, client-metric summaries.

Kept apart from the loop (``server.runner``) so each rule can be unit-tested without Flower
processes: which replies count, when a round fails, what goes into the metrics row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from strategies import protocol
from strategies.guard import ArraySpec, check_reply


@dataclass
class RoundReplies:
    """Replies of one round split into usable ones and failures (with reasons).

    ``rejected`` lists the replies the guard turned away, as ``{"partition", "node", "reason"}``
    (they are among ``failures`` too).
    """

    ok: list[Message] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    wire_bytes: int = 0  # arrays received as they travelled (packed, maybe compressed)

    @property
    def num_failures(self) -> int:
        return len(self.failures)


def classify_replies(replies: Iterable[Message], sent: Mapping[int, int],
                     expected: Mapping[str, ArraySpec] | None = None, guard: bool = True,
                     message_nodes: Mapping[str, int] | None = None) -> RoundReplies:
    """Sort replies into usable ones and failures.

    Parameters
    ----------
    replies : iterable of Message
        What ``grid.send_and_receive`` returned.
    sent : mapping
        Node id -> partition id of every message sent this round.
    expected : mapping of str to ArraySpec, optional
        The arrays each train reply must upload (exactly these keys, shapes and dtypes; None: a
        reply without arrays, such as the teacher check's).
    guard : bool
        Run :func:`strategies.guard.check_reply` on train replies (``reply-guard``); with it off,
        only the keys are compared.
    message_nodes : mapping, optional
        Message id -> destination node id of the messages sent. The SuperLink answers for a node
        it considers gone (no heartbeat) with an error reply of its own (source node
        ``SUPERLINK_NODE_ID``); this maps it back to the node and partition it stands for.

    Returns
    -------
    RoundReplies
        A reply fails when it carries an error, comes from an unexpected node, reports another
        partition id, is a second reply for its partition, or fails the guard; a sent message
        without reply fails too.
    """
    out = RoundReplies()
    seen: set[int] = set()
    for reply in replies:
        nid = reply.metadata.src_node_id
        if nid == SUPERLINK_NODE_ID and reply.has_error() and message_nodes:
            nid = message_nodes.get(reply.metadata.reply_to_message_id, nid)
        pid = sent.get(nid)
        if pid is None:
            out.failures.append(f"node {nid}: reply to a message this round did not send")
            continue

        def reject(reason: str) -> None:
            out.failures.append(f"partition {pid} (node {nid}): rejected: {reason}")
            out.rejected.append({"partition": pid, "node": nid, "reason": reason})

        if nid in seen:
            reject("a second reply for this partition in one round")
            continue
        seen.add(nid)
        if reply.has_error():
            out.failures.append(f"partition {pid} (node {nid}): {reply.error.reason}")
            continue
        metrics = reply.content.metric_records.get(protocol.METRICS)
        if metrics is None or protocol.NUM_EXAMPLES not in metrics:
            out.failures.append(f"partition {pid} (node {nid}): reply without '{protocol.NUM_EXAMPLES}' metric")
            continue
        if int(metrics.get(protocol.PARTITION_ID, -1)) != pid:
            out.failures.append(f"partition {pid} (node {nid}): reply claims partition {metrics.get(protocol.PARTITION_ID)}")
            continue
        if expected is not None:
            arrays = reply.content.array_records.get(protocol.ARRAYS)
            if guard:
                reason = check_reply(arrays, metrics[protocol.NUM_EXAMPLES], expected)
            else:
                got = set(arrays.keys()) if arrays is not None else set()
                reason = None if got == set(expected) else f"uploaded {len(got)} tensors, expected the {len(expected)} asked for"
            if reason is not None:
                reject(reason)
                continue
        out.ok.append(reply)
    for nid, pid in sent.items():
        if nid not in seen:
            out.failures.append(f"partition {pid} (node {nid}): no reply before the round timeout")
    return out


def required_replies(num_sampled: int, min_fraction: float) -> int:
    """Fewest successful replies a round may have: ``ceil(min_fraction * sampled)``, at least 1."""
    return max(1, math.ceil(min_fraction * num_sampled - 1e-9))


def reply_metrics(reply: Message) -> dict[str, float]:
    return {k: float(v) for k, v in reply.content.metric_records[protocol.METRICS].items() if not isinstance(v, list)}


def reply_info(reply: Message) -> dict:
    """A reply's ``info`` ConfigRecord as a dict (empty when it has none)."""
    info = reply.content.config_records.get(protocol.INFO)
    return dict(info) if info is not None else {}


def reply_domain(reply: Message) -> str:
    return str(reply_info(reply).get(protocol.DOMAIN, "?"))


def pseudo_summary(per_client: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Round-level pseudo-label numbers: boxes per teacher-seen image, mean precision/recall.

    Per image = boxes summed over clients / images the teachers saw (used + skipped).
    """
    def total(key: str) -> float:
        return float(sum(m.get(key, 0.0) for m in per_client.values()))

    seen = total("pseudo_images") + total("images_skipped")
    out = {"reliable_per_image": total("pseudo_reliable") / seen if seen else 0.0,
           "uncertain_per_image": total("pseudo_uncertain") / seen if seen else 0.0,
           "images_skipped": total("images_skipped"), "teacher_images": seen}
    for key in ("pseudo_reliable_precision", "pseudo_reliable_recall", "pseudo_uncertain_precision", "pseudo_uncertain_recall"):
        values = [m[key] for m in per_client.values() if key in m and m[key] >= 0]
        if values:
            out[key.removeprefix("pseudo_")] = float(np.mean(values))
    return out


def personal_summary(per_client: Mapping[str, Mapping[str, float]], domains: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Personalised mAP per domain (mean over that domain's clients) and their unweighted ``Total``."""
    by_domain: dict[str, list[tuple[float, float]]] = {}
    for pid, m in per_client.items():
        if "personal_map50" in m:
            by_domain.setdefault(domains[pid], []).append((m["personal_map50"], m["personal_map50_95"]))
    out = {d: {"map50": float(np.mean([v[0] for v in vals])), "map50_95": float(np.mean([v[1] for v in vals]))}
           for d, vals in sorted(by_domain.items())}
    if out:
        out["Total"] = {k: float(np.mean([v[k] for v in out.values()])) for k in ("map50", "map50_95")}
    return out


def site_summary(per_client: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Federated evaluation: each deployed site's mAP50 of the broadcast and of its personalised model
    on its own labelled hold-out (only sites that reported one), keyed ``client-<partition>``."""
    return {f"client-{pid}": {"broadcast_map50": m["site_map50"], "broadcast_map50_95": m["site_map50_95"],
                              "personal_map50": m.get("personal_map50", -1.0),
                              "personal_map50_95": m.get("personal_map50_95", -1.0)}
            for pid, m in sorted(per_client.items(), key=lambda kv: int(kv[0])) if "site_map50" in m}


def mean_losses(per_client: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean of each ``loss_*`` over clients."""
    weights = {pid: m.get(protocol.NUM_EXAMPLES, 0.0) for pid, m in per_client.items()}
    total = sum(weights.values())
    keys = sorted({k for m in per_client.values() for k in m if k.startswith("loss_")})
    if not total:
        return {}
    return {k: float(sum(m.get(k, 0.0) * weights[p] for p, m in per_client.items()) / total) for k in keys}
