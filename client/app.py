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

Where the data is (``client.task.node_partition``): in simulation the node config has only
``partition-id`` and the data is the manifest the server names; a deployed SuperNode gets
``--node-config 'site="/data/site"'``, its own exported site folder (``fedsto data export-site``),
and reads nothing else. A deployed site has no labels: its replies carry counts, losses and
weights, plus mAP on its own labelled hold-out if its site manifest declares one (the list of
what leaves a site is in ``docs/deployment.md``).

Resources: the run's ``device``, ``client-threads`` and ``batch-size`` apply unless the node config
says otherwise (``device``, ``threads``, ``batch-size``: a site with a smaller GPU). A round that
runs out of CUDA memory is retried once at half the batch (``oom-retry``); otherwise, or when the
retry fails too, the reply is an error naming the partition, the batch and the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import torch

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node_state import NodeStateStore
from client.task import (build_client_model, cuda_memory, evaluate_on_site, finite_metrics, load_site, node_partition,
                         resolve_device, set_threads, teacher_check, train_round, with_node_overrides)
from detection.model import get_state
from detection.sites import ClientSite
from strategies import FederatedStrategy, get_strategy, protocol
from strategies.base import split_extra, with_extra
from strategies.protocol import RoundInstructions
from strategies.transport import held_record, packed_arrays_mod

log = logging.getLogger("fedsto.client")


def ray_node_id() -> str | None:
    """The Ray node this process runs on when it is a simulation's actor (None on a SuperNode)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


class ClientOutOfMemory(RuntimeError):
    """A round that did not fit the client's GPU (the reply's error names the batch and the memory)."""

app = ClientApp(mods=[packed_arrays_mod])  # weights travel packed: strategies/transport.py

# Metrics every train reply carries, so replies of one round always have the same keys.
DEFAULT_REPLY_METRICS = ("steps_skipped", "images_skipped", "pseudo_images", "pseudo_reliable", "pseudo_uncertain",
                         "oom_batch_size")


def _client_site(msg: Message, context: Context) -> ClientSite:
    pid, local = node_partition(context.node_config)
    config = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
    path = local or config.get("federation")
    if not path:
        raise ValueError("no data: the node config has no 'site' and the server sent no federation manifest")
    return load_site(path, pid)


def load_broadcast(msg: Message, context: Context, ins: RoundInstructions, site: ClientSite
                   ) -> tuple[FederatedStrategy, object, NodeStateStore]:
    """The round's strategy and model: the broadcast with this node's saved local state on top."""
    strategy = get_strategy(ins.strategy, ins.strategy_options)
    model = build_client_model(ins, site)
    broadcast, extra = split_extra(msg.content[protocol.ARRAYS].to_torch_state_dict())
    store = NodeStateStore.for_node(context.node_config, ins.run_key, site.partition_id)
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
    """Who am I: partition id, domain, image count, federation id and versions (no path, label or image).

    The server names the model yaml; the reply hashes it as this site's Ultralytics reads it.
    """
    site = _client_site(msg, context)
    model = str(msg.content.config_records.get(protocol.CONFIG, ConfigRecord()).get("model", ""))
    info = ConfigRecord({protocol.PARTITION_ID: site.partition_id, protocol.DOMAIN: site.domain, "images": len(site.images),
                         "holdout": len(site.eval_records) if site.deployed else 0,
                         protocol.FEDERATION_ID: site.federation_id,
                         **protocol.site_versions(model)})
    return Message(RecordDict({protocol.INFO: info}), reply_to=msg)


@app.evaluate("teacher")
def evaluate_teacher(msg: Message, context: Context) -> Message:
    """Warm-up quality check: pseudo boxes per image of the broadcast model on this client's images."""
    ins = with_node_overrides(RoundInstructions.from_config(msg.content[protocol.CONFIG]), context.node_config)
    site = _client_site(msg, context)
    set_threads(ins.client_threads)
    device = resolve_device(ins.device)
    _, model, _ = load_broadcast(msg, context, ins, site)
    result = teacher_check(model, site, ins, device)
    result[protocol.PARTITION_ID] = float(site.partition_id)
    result[protocol.NUM_EXAMPLES] = float(len(site.images))
    info = ConfigRecord({protocol.DOMAIN: site.domain})
    return Message(RecordDict({protocol.METRICS: MetricRecord(finite_metrics(result)), protocol.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round (see the module docstring)."""
    start = time.perf_counter()
    ins = with_node_overrides(RoundInstructions.from_config(msg.content[protocol.CONFIG]), context.node_config)
    site = _client_site(msg, context)
    threads = set_threads(ins.client_threads)
    device = resolve_device(ins.device)
    strategy, model, store = load_broadcast(msg, context, ins, site)
    metrics = {k: 0.0 for k in DEFAULT_REPLY_METRICS}
    if ins.evaluate_personal and site.deployed:  # federated evaluation: the broadcast on the site's own hold-out
        metrics.update(evaluate_on_site(model, site, ins.imgsz, "site", device))
    trained = time.perf_counter()
    try:
        stats = train_round(model, site, ins, strategy.client_loss(model, ins), device)
    except torch.cuda.OutOfMemoryError:
        memory = cuda_memory(device)
        if not (ins.oom_retry and ins.batch_size > 1):
            raise ClientOutOfMemory(f"partition {site.partition_id}: CUDA out of memory at batch {ins.batch_size} "
                                    f"on {device}; {memory}") from None
        log.warning("partition %d: CUDA out of memory at batch %d (%s); retrying at batch %d",
                    site.partition_id, ins.batch_size, memory, ins.batch_size // 2)
        torch.cuda.empty_cache()
        ins = dataclasses.replace(ins, batch_size=ins.batch_size // 2)
        strategy, model, store = load_broadcast(msg, context, ins, site)  # the failed attempt moved the weights
        try:
            stats = train_round(model, site, ins, strategy.client_loss(model, ins), device)
        except torch.cuda.OutOfMemoryError:
            raise ClientOutOfMemory(f"partition {site.partition_id}: CUDA out of memory at batch {ins.batch_size * 2} "
                                    f"and again at {ins.batch_size} on {device}; {cuda_memory(device)}") from None
        metrics["oom_batch_size"] = float(ins.batch_size)
    train_seconds = time.perf_counter() - trained
    store.save(ins.server_round, strategy.client_state(model))
    metrics.update(stats.as_metrics())
    if ins.evaluate_personal:
        metrics.update(evaluate_on_site(model, site, ins.imgsz, "personal", device))
    metrics.update({protocol.NUM_EXAMPLES: float(examples_used(stats)), "local_images": float(len(site.images)),
                    protocol.PARTITION_ID: float(site.partition_id),
                    "threads": float(threads), "client_seconds": time.perf_counter() - start,
                    "setup_seconds": trained - start, "train_seconds": train_seconds})
    upload = held_record(with_extra(get_state(model, strategy.upload_keys(model, ins.upload)), strategy.client_arrays()))
    info = ConfigRecord({protocol.DOMAIN: site.domain, "phase": ins.phase})
    node = ray_node_id()
    if node is not None:  # simulation: which machine of the Ray cluster trained this client
        info[protocol.RAY_NODE] = node
    log.info("partition %d round %d (%s): %d steps, %.1fs", site.partition_id, ins.server_round, ins.phase, stats.steps,
             metrics["client_seconds"])
    return Message(RecordDict({protocol.ARRAYS: upload, protocol.METRICS: MetricRecord(finite_metrics(metrics)),
                               protocol.INFO: info}), reply_to=msg)
