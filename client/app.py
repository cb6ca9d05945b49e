"""The Flower ClientApp: a FedSTO client.

Handlers (message type -> what the client does):

* ``query.partition``: report this node's partition id, domain and image count (the server
  samples by partition id, since Flower's node ids are random per run);
* ``evaluate.teacher``: the warm-up quality check, pseudo boxes per image the broadcast model
  would produce on this client's images;
* ``train``: one local round: load the broadcast (plus the local state the strategy keeps, saved
  on the node's disk by ``client.node_state``), train the groups the instructions name on
  local-EMA-teacher pseudo labels (plus the strategy's loss hook), save the local state,
  optionally evaluate the personalised model on the own domain, reply with the upload keys only.

The partition comes from ``context.node_config["partition-id"]`` (simulation sets it; a deployed
SuperNode gets ``--node-config 'partition-id=N'``, optionally ``federation="/path"`` to read a
local copy of the manifest).
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node_state import NodeStateStore
from client.task import (ClientData, build_client_model, evaluate_personal, finite_metrics, node_partition,
                         resolve_device, set_threads, teacher_check, train_round)
from detection.model import get_state
from strategies import FederatedStrategy, get_strategy, protocol
from strategies.base import split_extra, with_extra
from strategies.protocol import RoundInstructions

log = logging.getLogger("fedsto.client")

app = ClientApp()

# Metrics every train reply carries, so replies of one round always have the same keys.
DEFAULT_REPLY_METRICS = ("steps_skipped", "images_skipped", "pseudo_images", "pseudo_reliable", "pseudo_uncertain")


def _client_data(msg: Message, context: Context) -> ClientData:
    pid, override = node_partition(context.node_config)
    config = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
    manifest = override or config.get("federation")
    if not manifest:
        raise ValueError("no federation manifest: the server sent none and the node config has no 'federation'")
    return ClientData.load(manifest, pid)


def load_broadcast(msg: Message, context: Context, ins: RoundInstructions, data: ClientData
                   ) -> tuple[FederatedStrategy, object, NodeStateStore]:
    """The round's strategy and model: the broadcast with this node's saved local state on top."""
    strategy = get_strategy(ins.strategy, ins.strategy_options)
    model = build_client_model(ins, data)
    broadcast, extra = split_extra(msg.content[protocol.ARRAYS].to_torch_state_dict())
    store = NodeStateStore.for_node(context.node_config, ins.run_key, data.partition_id)
    strategy.client_load(model, broadcast, extra, store.load(before_round=ins.server_round))
    return strategy, model, store


def examples_used(stats) -> int:
    """FedAvg weight: the local images, less the share the teacher gave too few reliable boxes to use.

    With ``min-reliable-boxes`` a client may train on a fraction of its images (foggy images under
    a clear-weather teacher: often under 10%); weighting it by all its images would let a barely
    trained model count as much as a well-trained one. At least 1, so a round never has zero weight.
    """
    used, skipped = stats.extra.get("pseudo_images", 0.0), stats.extra.get("images_skipped", 0.0)
    if used + skipped <= 0:
        return max(1, int(stats.num_examples))
    return max(1, int(round(stats.num_examples * used / (used + skipped))))


@app.query("partition")
def query_partition(msg: Message, context: Context) -> Message:
    """Who am I: partition id, domain, number of images (no labels, no images leave the node)."""
    data = _client_data(msg, context)
    info = ConfigRecord({protocol.PARTITION_ID: data.partition_id, protocol.DOMAIN: data.domain, "images": len(data.images),
                         "federation": str(data.federation.path)})
    return Message(RecordDict({protocol.INFO: info}), reply_to=msg)


@app.evaluate("teacher")
def evaluate_teacher(msg: Message, context: Context) -> Message:
    """Warm-up quality check: pseudo boxes per image of the broadcast model on this client's images."""
    ins = RoundInstructions.from_config(msg.content[protocol.CONFIG])
    data = _client_data(msg, context)
    set_threads(ins.client_threads)
    device = resolve_device()
    _, model, _ = load_broadcast(msg, context, ins, data)
    result = teacher_check(model, data, ins, device)
    result[protocol.PARTITION_ID] = float(data.partition_id)
    result[protocol.NUM_EXAMPLES] = float(len(data.images))
    info = ConfigRecord({protocol.DOMAIN: data.domain})
    return Message(RecordDict({protocol.METRICS: MetricRecord(finite_metrics(result)), protocol.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round (see the module docstring)."""
    start = time.perf_counter()
    ins = RoundInstructions.from_config(msg.content[protocol.CONFIG])
    data = _client_data(msg, context)
    threads = set_threads(ins.client_threads)
    device = resolve_device()
    strategy, model, store = load_broadcast(msg, context, ins, data)
    stats = train_round(model, data, ins, strategy.client_loss(model, ins), device)
    store.save(ins.server_round, strategy.client_state(model))
    metrics = {k: 0.0 for k in DEFAULT_REPLY_METRICS}
    metrics.update(stats.as_metrics())
    if ins.evaluate_personal:
        metrics.update(evaluate_personal(model, data, ins.imgsz, device))
    metrics.update({protocol.NUM_EXAMPLES: float(examples_used(stats)), "local_images": float(len(data.images)),
                    protocol.PARTITION_ID: float(data.partition_id),
                    "threads": float(threads), "client_seconds": time.perf_counter() - start})
    upload = ArrayRecord(with_extra(get_state(model, strategy.upload_keys(model, ins.upload)), strategy.client_arrays()))
    info = ConfigRecord({protocol.DOMAIN: data.domain, "phase": ins.phase})
    log.info("partition %d round %d (%s): %d steps, %.1fs", data.partition_id, ins.server_round, ins.phase, stats.steps,
             metrics["client_seconds"])
    return Message(RecordDict({protocol.ARRAYS: upload, protocol.METRICS: MetricRecord(finite_metrics(metrics)),
                               protocol.INFO: info}), reply_to=msg)
