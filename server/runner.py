"""The ServerApp's loop: warm-up, phases, server epochs, evaluation, checkpoints, resume.

:class:`FederatedRun` walks the :class:`~server.plan.Plan`. It owns the loop (not
``Strategy.start``), because FedSTO needs things ``start`` cannot do: merge a backbone-only
average into the server's model, train the server one supervised epoch between rounds, and
continue from a checkpoint. The strategy object still decides what travels and how replies are
aggregated (``strategies.base``).

Per client round::

    sample partitions (seeded) -> strategy.configure_round (global state, upload keys)
    -> broadcast full state (+ the strategy's extra arrays) + RoundInstructions (ConfigRecord)
    -> push, pull the replies as they come (server.exchange) -> classify replies and guard them
       (failures and rejections counted; below min-reply-fraction: fail)
    -> strategy.aggregate (sorted by partition id)
    -> strategy.merge into the server model
    -> server epoch(s) on the labelled set (orthogonality in phase 2) -> evaluate -> checkpoint
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from detection.images import LetterboxCache
from detection.sites import load_server_site, write_partition_index
from detection.metrics import evaluate_domains
from detection.model import GROUPS, build_model, export_ultralytics, get_state, set_state
from detection.orthogonality import OrthogonalityRegulariser
from detection.seeds import derive_seed
from detection.tables import print_table
from detection.train import TrainConfig, train_labelled
from detection.ultralytics_env import fedsto_home
from server import rundir as rd
from server.config import RunConfig
from server.exchange import send_and_receive
from server.plan import Plan, Step, build_plan
from server.prepare import ensure_synthetic_federation
from server.ray_recovery import worker_died
from server.rounds import (RoundReplies, classify_replies, mean_losses, personal_summary, pseudo_summary, reply_domain,
                           reply_info, reply_metrics, required_replies, site_summary)
from server.sampling import Discovery, discover_partitions, query_partitions, sample_partitions, sample_teacher_check
from server.state import ServerState, checkpoint_payload, restore_checkpoint
from server.warmup_cache import WarmupCache, warmup_key
from server.teacher_check import TeacherThresholds, summarise_teacher_check
from strategies import FederatedStrategy, StrategyError, get_strategy, protocol, transport
from strategies.base import RoundContext, split_extra, with_extra
from strategies.guard import expected_specs
from strategies.protocol import RoundInstructions

log = logging.getLogger("fedsto.server")

# Seed stream of the server-side regulariser's power-iteration vectors.
SERVER_ORTHO_STREAM = 0x05E7


@contextmanager
def timed(parts: dict, key: str):
    """Add the seconds the block takes to ``parts[key]`` (a round's ``seconds_by_part``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0


class RunFailed(RuntimeError):
    """The run cannot go on (too few replies, no clients...). ``result.json`` says why."""


def round_metrics(results: dict, digits: int = 6) -> dict:
    """Per-domain eval results reduced to mAP50 / mAP50-95 (rounded for the JSONL)."""
    return {d: {"map50": round(float(r["map50"]), digits), "map50_95": round(float(r["map50_95"]), digits)}
            for d, r in results.items()}


class FederatedRun:
    """One run of a method on a federation, through a Flower ``Grid``.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Message transport to the clients (a real Grid, or an in-process one in tests).
    cfg : RunConfig
        The run config.
    strategy : FederatedStrategy, optional
        Default: ``get_strategy(cfg.strategy, cfg.strategy_options)``.
    console : rich.console.Console, optional
        Where tables and step lines go (stdout is streamed by Flower's log uploader).
    """

    def __init__(self, grid, cfg: RunConfig, strategy: FederatedStrategy | None = None, console: Console | None = None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.strategy = strategy or get_strategy(cfg.strategy, cfg.strategy_options)
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.device = cfg.resolved_device()
        self.state = ServerState()
        self.optimizer_state: dict | None = None
        self.discovery: Discovery | None = None
        self._reply_base = None  # the broadcast as clients decode it: the base of fp16-delta replies (transport)
        self._bytes_model: int | None = None
        self.run_dir: rd.RunDir | None = None
        self._log_file = None

    # -- output ----------------------------------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style)
        if self._log_file is not None:
            self._log_file.write(time.strftime("%H:%M:%S ") + text + "\n")
            self._log_file.flush()

    def warn(self, text: str) -> None:
        self.say(f"WARNING: {text}", style="bold red")

    # -- setup -----------------------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(cfg.server_threads or os.cpu_count() or 1)
        manifest = cfg.federation_path()
        manifest, built = ensure_synthetic_federation(
            manifest, num_images=cfg.synthetic_images, imgsz=cfg.synthetic_imgsz, num_clients=cfg.synthetic_clients,
            weathers=cfg.weathers, server_fraction=cfg.synthetic_server_fraction,
            test_fraction=cfg.synthetic_test_fraction, seed=cfg.seed)
        self.manifest = manifest
        self.site = load_server_site(manifest)
        if not self.site.deployed:
            try:  # simulation clients then read only their partitions (detection.sites.write_partition_index)
                write_partition_index(manifest)
            except OSError as exc:
                self.warn(f"no partition index beside {manifest} ({exc}); each client process parses the whole manifest")
        self.plan: Plan = build_plan(cfg.method, cfg.warmup_epochs, cfg.phase1_rounds, cfg.phase2_rounds,
                                     cfg.server_epochs, cfg.eval_every)
        run_config = cfg.to_run_config()
        path = cfg.run_dir()
        checkpoint = None
        if cfg.resume:
            self.run_dir = rd.RunDir.reopen(path, run_config, cfg.keep_checkpoints)
            checkpoint = self.run_dir.latest_checkpoint()
        else:
            self.run_dir = rd.RunDir.create(path, self._config_record(run_config), cfg.keep_checkpoints)
        self._log_file = (self.run_dir.path / "server.log").open("a", encoding="utf-8")
        if built:
            self.say(f"built synthetic federation {manifest}")

        names = self.site.class_names
        torch.manual_seed(cfg.seed)  # model init is part of what the seed fixes
        self.model = build_model(cfg.model, len(names), names, weights=cfg.weights or None)
        self.strategy.setup(self.model)
        self.parameter_keys = frozenset(n for n, p in self.model.named_parameters() if p.is_floating_point())
        if checkpoint is not None:
            self.state, self.optimizer_state = restore_checkpoint(self.model, checkpoint)
            self.strategy.load_state_dict(checkpoint.get("strategy_state") or {})
            dropped = self.run_dir.truncate_metrics(self.state.step)
            self.say(f"resuming {self.run_dir.path} after step {self.state.step}/{len(self.plan.steps)} "
                     f"({checkpoint['label']}); {dropped} metrics row(s) of unfinished steps dropped")
        elif cfg.resume:
            self.run_dir.truncate_metrics(0)
            self.say(f"resuming {self.run_dir.path}: no checkpoint yet, starting from the beginning")

        self.labelled = self.site.labelled if self.plan.labels == "server" else self.site.all_train_records()
        self.tests = self.site.tests
        self.train_cache = LetterboxCache(cfg.imgsz)
        self.eval_caches: dict[str, LetterboxCache] = {}
        self.train_config = TrainConfig(imgsz=cfg.imgsz, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, epochs=1, trainable=GROUPS, augment=cfg.server_augment,
                                        scale=cfg.augment_scale, translate=cfg.augment_translate,
                                        seed=cfg.seed, device=self.device, amp=cfg.amp,
                                        progress=cfg.progress and sys.stdout.isatty())
        # the reused warm-up's training seconds (they count in state.elapsed); None: trained here
        self.warmup_cache, self.warmup_key, self.warmup_reused_seconds = None, None, None
        if cfg.warmup_cache and self.plan.warmup_epochs:
            changes_server_loss = type(self.strategy).server_loss is not FederatedStrategy.server_loss
            self.warmup_key, self.warmup_parts = warmup_key(cfg, self.manifest, self.plan.labels, self.device,
                                                            self.strategy.describe() if changes_server_loss else "")
            self.warmup_cache = WarmupCache(fedsto_home() / "warmups")
        self.loggers = rd.OptionalLoggers(self.run_dir.path, cfg.tensorboard, cfg.mlflow, self.run_dir.path.name, run_config)
        for note in self.loggers.notes:
            self.say(note)

    def _config_record(self, run_config: dict) -> dict:
        import flwr
        import ultralytics

        return {"run_config": run_config, "federation": str(self.manifest), "federation_sizes": self.site.sizes(),
                "federation_id": self.site.federation_id, "deployed": self.site.deployed,
                "domains": self.site.domains, "server_domain": self.site.server_domain,
                "plan": [list(r) for r in self.plan.describe()], "num_steps": len(self.plan.steps),
                "versions": {"python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
                             "ultralytics": ultralytics.__version__},
                "device": self.device, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Walk the remaining steps; returns the ``result.json`` content. Raises :class:`RunFailed`."""
        try:
            self._prepare()
        except Exception as exc:
            if self.run_dir is not None:
                self.run_dir.write_result("failed", reason=f"setup: {exc}", **self._failure_record())
            raise
        try:
            return self._run_steps()
        except Exception as exc:
            self.run_dir.write_result("failed", reason=str(exc), last_step=self.state.step, **self._failure_record())
            self.run_dir.write_progress(self.state.step, len(self.plan.steps), "failed", status="failed")
            self.say(f"run failed: {exc}", style="bold red")
            raise
        finally:
            self.loggers.close()
            if self._log_file is not None:
                self._log_file.close()

    def _run_steps(self) -> dict:
        cfg, plan = self.cfg, self.plan
        if self.state.step == 0 and self.warmup_cache is not None:
            self._reuse_warmup()
        remaining = plan.remaining(self.state.step)
        self.say(f"fedsto {cfg.method} ({self.strategy.describe()}) on {self.manifest}: {len(self.labelled)} labelled server images, "
                 f"{self.site.num_clients} clients, domains {', '.join(self.site.domains)}; device {self.device}; "
                 f"run dir {self.run_dir.path}")
        for stage, n, what in plan.describe():
            self.say(f"  {stage:>7} x{n}: {what}")
        first = next((s for s in remaining if s.clients), None)
        if first is not None:
            self._discover(first)
        total = len(plan.steps)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, disable=not (cfg.progress and self.console.is_terminal)) as bar:
            task = bar.add_task(cfg.method, total=total, completed=self.state.step)
            for step in remaining:
                self.run_dir.write_progress(step.index - 1, total, step.label)
                self._run_step(step)
                bar.update(task, completed=step.index, description=f"{cfg.method}: {step.label}")
        return self._finish()

    def _reuse_warmup(self) -> None:
        """Start after the warm-up when the cache holds this run's (as a resume from its last epoch would)."""
        entry, source = self.warmup_cache.load(self.warmup_key), self.warmup_key
        if entry is None:
            prefix = self.warmup_cache.longest_prefix(self.warmup_parts)
            if prefix is None:
                return
            source, entry = prefix
        checkpoint = entry["checkpoint"]
        self.state, self.optimizer_state = restore_checkpoint(self.model, checkpoint)
        self.strategy.load_state_dict(checkpoint.get("strategy_state") or {})
        for row in entry["metrics"]:
            self.run_dir.append_metrics({**row, "method": self.cfg.method})
        last = self.plan.steps[self.state.step - 1]
        self._checkpoint(last, is_best=self.state.best_step == last.index)
        self.warmup_reused_seconds = entry["seconds"]
        reused = self.state.step
        more = (f"; epochs {reused + 1}-{self.plan.warmup_epochs} train now and are stored as a warm-up of their own"
                if reused < self.plan.warmup_epochs else "")
        self.say(f"warm-up: {reused} of {self.plan.warmup_epochs} epochs reused from {self.warmup_cache.folder(source)} "
                 f"(trained {entry['created']} in {entry['seconds']:.0f}s){more}; warmup-cache=false trains it again")

    def _store_warmup(self, checkpoint: dict) -> None:
        rows = [r for r in self.run_dir.read_metrics() if r.get("kind") == "warmup"]
        self.warmup_cache.save(self.warmup_key, self.warmup_parts, checkpoint, rows, sum(r["seconds"] for r in rows))

    def _failure_record(self) -> dict:
        """What ``result.json`` says about failures, whichever way the run ends."""
        st = self.state
        return {"failures": st.failures, "failures_by_step": st.failures_by_step, "rejections": st.rejections,
                "failure_reasons": st.failure_reasons, "site_failures": st.site_failures}

    def _query_config(self) -> dict:
        return {"federation": str(self.manifest), "model": self.cfg.model}

    def _handshake(self) -> dict:
        """What every site must report in the partition query (federation id, versions)."""
        return {protocol.FEDERATION_ID: self.site.federation_id, **protocol.site_versions(self.cfg.model)}

    def _site_failures(self, failures: list[str], where: str) -> None:
        """Warn about and record each site problem once (an unmapped node is asked again every round)."""
        seen = {f["reason"] for f in self.state.site_failures}
        failures = [f for f in dict.fromkeys(failures) if f not in seen]
        for failure in failures:
            self.warn(f"{where}: {failure}")
        self.state.site_failures += [{"step": self.state.step, "where": where, "reason": f} for f in failures]

    def _discover(self, first: Step) -> None:
        """Map partitions to nodes; round ``first.round`` needs its own sample, not a share of every client."""
        cfg, n = self.cfg, self.site.num_clients
        wanted = self._sample(first.round)
        found = discover_partitions(self.grid, n, cfg.discovery_timeout, self._query_config(),
                                    handshake=self._handshake(), wanted=wanted)
        self._site_failures(found.failures, "partition discovery")
        needed = required_replies(len(wanted), cfg.min_reply_fraction)
        present = [pid for pid in wanted if pid in found.nodes]
        if len(present) < needed:
            raise RunFailed(f"only {len(present)} of the {len(wanted)} clients round {first.round} samples answered the "
                            f"partition query (min-reply-fraction {cfg.min_reply_fraction} needs {needed}): "
                            + "; ".join(found.failures[:4])
                            + (f"; in simulation start one SuperNode per client: flwr run ... --federation-config "
                               f"'num-supernodes={n}'" if not self.site.deployed else ""))
        self.discovery = found
        try:
            self.strategy.check_round_size(len(wanted), required_replies(len(wanted), cfg.min_reply_fraction))
        except StrategyError as err:
            raise RunFailed(f"before round 1: {err}") from None
        described = ", ".join(f"{pid}={info.get('domain')}({info.get('images')})" for pid, info in sorted(found.info.items())[:12])
        more = len(found.info) - 12
        self.say(f"clients: {len(found.nodes)} of {n} mapped; " + described + (f" and {more} more" if more > 0 else ""))

    def _sample(self, server_round: int) -> list[int]:
        """The partitions round ``server_round`` trains: drawn from every partition of the federation, not only
        those that answered, so a seed picks the same clients however sites connect."""
        return sample_partitions(range(self.site.num_clients), self.cfg.fraction_train, self.cfg.seed, server_round)

    def _run_step(self, step: Step) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        row: dict = {"step": step.index, "kind": step.kind, "phase": step.phase_name, "round": step.round,
                     "phase_round": step.phase_round, "method": cfg.method}
        if step.clients:
            if not self.state.teacher_checked:
                row["teacher_check"] = self._teacher_check(step)
                self.state.teacher_checked = True
            row.update(self._client_round(step))
        server = []
        parts = row.setdefault("seconds_by_part", {})
        if step.clients and cfg.server_momentum == "reset":
            self.optimizer_state = None
        t_server = time.perf_counter()
        for epoch in range(step.server_epochs):
            reg = None
            if step.orthogonality and cfg.ortho_lambda > 0:
                reg = OrthogonalityRegulariser(self.model, form=cfg.ortho_form, coefficient=cfg.ortho_lambda,
                                               seed=derive_seed(cfg.seed, step.index, epoch, SERVER_ORTHO_STREAM))
            tc = self.train_config.replace(warmup_steps=cfg.warmup_lr_steps if (step.index == 1 and epoch == 0) else 0,
                                           description=f"{step.label}: server epoch")
            stats, self.optimizer_state = train_labelled(self.model, self.labelled, tc,
                                                         optimizer_state=self.optimizer_state, regulariser=reg,
                                                         cache=self.train_cache, seed_parts=(step.index, epoch),
                                                         loss_hook=self.strategy.server_loss(self.model))
            server.append(stats.as_metrics())
        parts["server_epochs"] = time.perf_counter() - t_server
        if server:
            row["server"] = {k: float(np.mean([s.get(k, 0.0) for s in server])) for k in server[-1]}
            row["server"]["epochs"] = len(server)
            row["server"]["orthogonality"] = bool(step.orthogonality and cfg.ortho_lambda > 0)
        if step.evaluate:
            with timed(parts, "evaluation"):
                results = evaluate_domains(self.model, self.tests, cfg.imgsz, device=self.device, caches=self.eval_caches)
            row["eval"] = round_metrics(results)
            self.state.last_eval = row["eval"]
        seconds = time.perf_counter() - t0
        self.state.elapsed += seconds
        row["seconds_by_part"] = {k: round(v, 4) for k, v in parts.items()}
        row["seconds"] = round(seconds, 3)
        row["elapsed"] = round(self.state.elapsed, 3)
        self.run_dir.append_metrics(row)
        self.loggers.log(step.index, rd.flatten({k: v for k, v in row.items() if k in ("server", "eval", "pseudo", "bytes_up", "bytes_down", "failures", "personal")}))
        is_best = False
        if "eval" in row and row["eval"]["Total"]["map50"] > self.state.best_map50:
            self.state.best_map50, self.state.best_step, is_best = row["eval"]["Total"]["map50"], step.index, True
        self.state.step = step.index
        checkpoint = self._checkpoint(step, is_best)
        if self.warmup_cache is not None and step.kind == "warmup" and step.index == self.plan.warmup_epochs:
            self._store_warmup(checkpoint)
        self.say(self._step_line(step, row))

    def _step_line(self, step: Step, row: dict) -> str:
        parts = [f"[{step.index}/{len(self.plan.steps)}] {step.label}: {row['seconds']:.1f}s"]
        if "server" in row:
            parts.append("server " + " ".join(f"{k[5:]} {v:.3f}" for k, v in row["server"].items() if k.startswith("loss_")))
        if "replies" in row:
            parts.append(f"replies {row['replies']}/{len(row['sampled'])}, up {row['bytes_up'] / 1e6:.2f} MB, "
                         f"down {row['bytes_down'] / 1e6:.2f} MB")
        if "pseudo" in row:
            p = row["pseudo"]
            parts.append(f"pseudo/img {p['reliable_per_image']:.2f}+{p['uncertain_per_image']:.2f}"
                         + (f" (prec {p['reliable_precision']:.2f})" if "reliable_precision" in p else ""))
        if "eval" in row:
            parts.append("mAP50 " + " ".join(f"{d} {m['map50']:.3f}" for d, m in row["eval"].items()))
        if "personal" in row and row["personal"]:
            parts.append("personal " + " ".join(f"{d} {m['map50']:.3f}" for d, m in row["personal"].items()))
        if "sites" in row:
            parts.append("site hold-outs " + " ".join(f"{s} {m['broadcast_map50']:.3f}->{m['personal_map50']:.3f}"
                                                      for s, m in row["sites"].items()))
        return "; ".join(parts)

    def _checkpoint(self, step: Step, is_best: bool) -> dict:
        payload = checkpoint_payload(self.model, self.state, self.optimizer_state, step.index, step.phase_name, step.round,
                                     step.label, self.cfg.to_run_config())
        payload["strategy_state"] = self.strategy.state_dict()
        self.run_dir.save_checkpoint(payload, step.index, is_best)
        return payload

    # -- client rounds ---------------------------------------------------------------------------

    def instructions(self, step: Step, evaluate_personal: bool) -> RoundInstructions:
        phase = step.phase
        return RoundInstructions.for_round(
            self.cfg, server_round=step.round, phase=step.phase_name, trainable=phase.client_groups,
            upload=phase.upload_groups, ortho_lambda=self.cfg.ortho_lambda if phase.orthogonality else 0.0,
            evaluate_personal=evaluate_personal, federation=str(self.manifest), run_key=self.run_dir.run_key)

    def _broadcast(self, extra: dict | None = None) -> ArrayRecord:
        """The model keys the strategy broadcasts, with its extra arrays beside them."""
        extra = self.strategy.server_arrays() if extra is None else extra
        return transport.held_record(with_extra(get_state(self.model, self.strategy.broadcast_keys(self.model)), extra))

    def _messages(self, partitions: list[int], arrays: ArrayRecord, ins: RoundInstructions, message_type: str) -> tuple[list[Message], dict[int, int]]:
        config = ConfigRecord(ins.to_config())
        packed, layout = transport.pack_arrays(arrays, ins.transport)  # once per round, not per client
        # What the clients will decode: the base of their fp16-delta replies.
        self._reply_base = (transport.as_base(transport.unpack_arrays(packed, layout))
                            if ins.transport == transport.HALF_DELTA else None)
        sent = {self.discovery.nodes[pid]: pid for pid in partitions}
        messages = [Message(RecordDict({protocol.ARRAYS: packed, transport.LAYOUT: layout, protocol.CONFIG: config}),
                            dst_node_id=nid, message_type=message_type) for nid in sorted(sent, key=sent.get)]
        return messages, sent

    def _exchange(self, messages: list[Message], sent: dict[int, int], expected=None, parts: dict | None = None) -> RoundReplies:
        """Send a round's messages; the replies, arrays unpacked (``strategies.transport``), sorted and guarded.

        A message whose simulation worker died (``server.ray_recovery``) is sent once more, to the
        worker that replaced it; a second death is a failure like any other.
        """
        parts = {} if parts is None else parts
        with timed(parts, "exchange"):
            replies = send_and_receive(self.grid, messages, timeout=self.cfg.round_timeout)
        message_nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set by the push
        by_id = {m.metadata.message_id: m for m in messages}
        lost = [r for r in replies if r.has_error() and worker_died(r.error.reason) and r.metadata.reply_to_message_id in by_id]
        if lost:
            again = []
            for reply in lost:
                first = by_id[reply.metadata.reply_to_message_id]
                nid = first.metadata.dst_node_id
                reason = reply.error.reason.split("\n")[0][:300]
                self._site_failures([f"partition {sent.get(nid)} (node {nid}): its simulation worker died ({reason}); "
                                     "sent again to a new worker"], f"step {self.state.step + 1}")
                again.append(Message(first.content, dst_node_id=nid, message_type=first.metadata.message_type))
            replies = [r for r in replies if r not in lost]
            with timed(parts, "exchange"):
                replies += send_and_receive(self.grid, again, timeout=self.cfg.round_timeout)
            message_nodes.update({m.metadata.message_id: m.metadata.dst_node_id for m in again})
        received = sum(transport.wire_bytes(r) for r in replies if not r.has_error())
        with timed(parts, "deserialise"):
            replies = [transport.unpacked(r, self._reply_base) for r in replies]
        with timed(parts, "guard"):
            classified = classify_replies(replies, sent, expected, guard=self.cfg.reply_guard, message_nodes=message_nodes)
        classified.wire_bytes = received
        return classified

    def _model_wire_bytes(self) -> int:
        """Bytes of the whole model packed as fp32: the yardstick of ``bytes_up`` / ``bytes_down``."""
        if self._bytes_model is None:
            self._bytes_model = transport.pack_arrays(transport.held_record(get_state(self.model)))[0].count_bytes()
        return self._bytes_model

    def _refresh_nodes(self) -> None:
        """Query nodes that connected since discovery (a restarted or late site) and remap their partitions."""
        known = set(self.discovery.nodes.values())
        connected = set(self.grid.get_node_ids())
        new = sorted(connected - known)
        if not new:
            return
        failures_before = len(self.discovery.failures)
        mapped = query_partitions(self.grid, new, self.discovery, self.site.num_clients, self.cfg.discovery_timeout,
                                  self._query_config(), self._handshake(), connected=connected)
        self._site_failures(self.discovery.failures[failures_before:], "partition refresh")
        if mapped:
            self.say("partition map refreshed: " + ", ".join(f"{pid} -> node {self.discovery.nodes[pid]}" for pid in mapped))

    def _client_round(self, step: Step) -> dict:
        cfg = self.cfg
        self._refresh_nodes()
        sampled = self._sample(step.round)
        parts: dict[str, float] = {}  # where the round's time goes (benchmarks/sim_overhead.py)
        with timed(parts, "prepare"):
            ins = self.instructions(step, evaluate_personal=step.evaluate and cfg.eval_personal)
            upload_keys = self.strategy.upload_keys(self.model, ins.upload)
            global_state = get_state(self.model)
            self.strategy.configure_round(RoundContext(step.round, global_state, upload_keys, self.parameter_keys, len(sampled)))
            extra = self.strategy.server_arrays()
            arrays = self._broadcast(extra)
        unmapped = [pid for pid in sampled if pid not in self.discovery.nodes]
        with timed(parts, "serialise"):
            messages, sent = self._messages([pid for pid in sampled if pid in self.discovery.nodes], arrays, ins, protocol.TRAIN)
        expected = expected_specs(with_extra({k: global_state[k] for k in upload_keys}, extra))
        replies = self._exchange(messages, sent, expected, parts)
        replies.failures += [f"partition {pid}: sampled, but no connected node has answered for it" for pid in unmapped]
        row: dict = {"sampled": sampled, "replies": len(replies.ok), "failures": replies.num_failures,
                     "failure_reasons": replies.failures, "bytes_down": sum(transport.wire_bytes(m) for m in messages),
                     "bytes_up": replies.wire_bytes, "bytes_model": self._model_wire_bytes(),
                     "transport": ins.transport,
                     "upload_keys": len(upload_keys), "rejected": replies.rejected}
        self.state.failures += replies.num_failures
        self.state.rejections += [{"round": step.round, **r} for r in replies.rejected]
        if replies.num_failures:
            self.state.failures_by_step[str(step.index)] = replies.num_failures
            self.state.failure_reasons += [{"step": step.index, "round": step.round, "reason": f} for f in replies.failures]
            for f in replies.failures:
                self.warn(f"round {step.round}: {f}")
        needed = max(required_replies(len(sampled), cfg.min_reply_fraction), self.strategy.min_replies())
        if len(replies.ok) < needed:
            row["status"] = "failed"
            self.run_dir.append_metrics({"step": step.index, "kind": step.kind, "phase": step.phase_name,
                                         "round": step.round, "method": cfg.method, **row})
            raise RunFailed(f"round {step.round}: {len(replies.ok)} of {len(sampled)} clients replied, "
                            f"min-reply-fraction {cfg.min_reply_fraction} and {self.strategy.name} need {needed}: "
                            + "; ".join(replies.failures))
        per_client = {str(int(reply_metrics(r)[protocol.PARTITION_ID])): reply_metrics(r) for r in replies.ok}
        domains = {str(int(reply_metrics(r)[protocol.PARTITION_ID])): reply_domain(r) for r in replies.ok}
        with timed(parts, "aggregate"):
            aggregate, _ = self.strategy.aggregate(step.round, replies.ok)
            if aggregate is None:
                raise RunFailed(f"round {step.round}: the strategy produced no aggregate from {len(replies.ok)} replies")
            model_part, extra_part = split_extra(aggregate)
            set_state(self.model, self.strategy.merge(global_state, model_part))
            self.strategy.load_server_arrays(extra_part)
        row["seconds_by_part"] = parts
        row["clients"] = {pid: {"domain": domains[pid], **m} for pid, m in sorted(per_client.items(), key=lambda kv: int(kv[0]))}
        for r in replies.ok:  # simulation on a Ray cluster: where each client ran
            node = reply_info(r).get(protocol.RAY_NODE)
            if node is not None:
                row["clients"][str(int(reply_metrics(r)[protocol.PARTITION_ID]))]["ray_node"] = str(node)
        row["client_losses"] = mean_losses(per_client)
        row["pseudo"] = pseudo_summary(per_client)
        if ins.evaluate_personal:
            row["personal"] = personal_summary(per_client, domains)
            sites = site_summary(per_client)
            if sites:
                row["sites"] = self.state.last_sites = sites
        return row

    # -- warm-up quality check -------------------------------------------------------------------

    def _teacher_check(self, step: Step) -> dict:
        """Before round 1: is the warm-up model good enough to teach? Loud warnings if not."""
        cfg = self.cfg
        existing = self.run_dir.read_json(rd.TEACHER_CHECK)
        if existing is not None:
            return existing["summary"]
        if self.state.last_eval is None:
            self.state.last_eval = round_metrics(evaluate_domains(self.model, self.tests, cfg.imgsz, device=self.device,
                                                                  caches=self.eval_caches))
        server_map50 = self.state.last_eval[self.site.server_domain]["map50"]
        server_density = float(np.mean([len(r.classes) for r in self.labelled])) if self.labelled else 0.0
        ins = self.instructions(step, evaluate_personal=False)
        checked = sample_teacher_check(self.discovery.partitions, cfg.teacher_check_clients, cfg.seed)
        messages, sent = self._messages(checked, self._broadcast(), ins, protocol.EVALUATE_TEACHER)
        replies = self._exchange(messages, sent)
        self.state.failure_reasons += [{"step": step.index, "round": "teacher check", "reason": f} for f in replies.failures]
        clients = {}
        for r in replies.ok:
            m = reply_metrics(r)
            clients[str(int(m[protocol.PARTITION_ID]))] = {"domain": reply_domain(r), **m}
        thresholds = TeacherThresholds(cfg.weak_teacher_map50, cfg.weak_teacher_density, cfg.weak_teacher_precision)
        summary, table, warnings = summarise_teacher_check(clients, self.site.server_domain, server_map50, server_density,
                                                           thresholds, replies.failures)
        print_table(self.console, table)
        for warning in warnings:
            self.warn(warning)
        self.run_dir.write_json(rd.TEACHER_CHECK, {"summary": summary})
        return summary

    # -- the end ---------------------------------------------------------------------------------

    def _finish(self) -> dict:
        from server.report import write_run_report

        cfg = self.cfg
        final = self.state.last_eval
        model_path = export_ultralytics(self.model, self.run_dir.path / rd.MODEL,
                                        {"imgsz": cfg.imgsz, "method": cfg.method, "strategy": cfg.strategy, "seed": cfg.seed})
        result = self.run_dir.write_result(
            "completed", method=cfg.method, strategy=cfg.strategy, steps=len(self.plan.steps), **self._failure_record(),
            sites=self.state.last_sites, final=final, best_map50=self.state.best_map50,
            best_step=self.state.best_step, elapsed_seconds=self.state.elapsed, model=str(model_path),
            warmup_cache={"key": self.warmup_key, "reused": self.warmup_reused_seconds is not None})
        try:
            write_run_report(self.run_dir.path)
        except Exception as exc:  # noqa: BLE001  (a broken plot must not turn a finished run into a failed one)
            self.warn(f"report: {exc}")
        self.run_dir.write_progress(len(self.plan.steps), len(self.plan.steps), "done", status="completed")
        reused = (f" ({self.warmup_reused_seconds:.0f}s of them the reused warm-up's)"
                  if self.warmup_reused_seconds is not None else "")
        self.say(f"done: {cfg.method}, {self.state.elapsed:.0f}s of steps{reused}, failures {self.state.failures}; "
                 f"model {model_path}; results {self.run_dir.path / 'results.md'}")
        return self.run_dir.read_json(rd.RESULT) or {"status": "completed", "path": str(result)}
