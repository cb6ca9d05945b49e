"""What the Ray simulation costs on top of the training it runs: simulated rounds vs the compute floor.

For 4, 16 and 64 clients, every client sampled every round, each with the same stated workload
(``--images-per-client`` synthetic images at 64 px, batch 8, one local epoch of SSFL: EMA-teacher
pseudo labels and the student's steps), this runs

* the **simulation**: a real ``fedsto run --method ssfl`` (Flower, Ray, one CPU per client actor,
  no server epochs, the test splits evaluated only after the last round), and
* the **floor**: the same clients' local rounds (``client.task.train_round``, the very function the
  ClientApp calls) one after the other in this process, plain PyTorch with the same number of
  threads as the simulation's CPUs, no Flower, no Ray, no serialisation (the issue's floor), and
* the **parallel floor**: the same, with the clients dealt over as many one-thread processes as
  the simulation has one-CPU actors, each round started together: the simulation's own
  parallelism without its messaging. Two one-thread processes beat one two-thread process on
  these small images, so the first ratio can fall below 1; the second is the overhead proper.

Per round it compares the simulation's round time (the ServerApp's, less the evaluation) with the
floor's, using the median over rounds 2.. (round 1 starts the actors and reads the images, and is
reported apart, as is the one-time start-up: SuperLink, Ray, the partition query). The breakdown
of a simulated round comes from the ServerApp's ``seconds_by_part`` and the clients' reply
metrics: server-side preparation, serialisation, guard and aggregation; inside the exchange, the
clients' set-up (reading the site, copying the model, loading the broadcast) and training, shared
over the parallel actors; the rest of the exchange is Flower and Ray moving messages and waiting.

    python -m benchmarks.sim_overhead                   # 4, 16, 64 clients, 6 rounds
    python -m benchmarks.sim_overhead --clients 16 --rounds 5

Prints a table and writes ``benchmarks/results/sim_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.sim_scale import same_work_federation
from benchmarks.simrun import fedsto_run, finish, read_rows, work_folder

HERE = Path(__file__).resolve().parent
SERVER_PARTS = ("prepare", "serialise", "deserialise", "guard", "aggregate")


def run_values(manifest: Path, fed_keys: dict, rounds: int, out: Path) -> dict:
    """The run config of the simulation (and of the floor's client instructions)."""
    from server.presets import merged_config, preset_path, read_preset

    overrides = {"federation": str(manifest), **fed_keys, "fraction-train": 1.0, "warmup-epochs": 0, "phase1-rounds": 0,
                 "phase2-rounds": rounds, "server-epochs": 0, "eval-every": 1000, "eval-personal": False,
                 "teacher-check-clients": 1, "imgsz": 64, "batch-size": 8, "progress": False,
                 "discovery-timeout": 600.0, "round-timeout": 3600.0}
    return merged_config(read_preset(preset_path("smoke", HERE.parent)), "ssfl", out, None, overrides)


def _floor_spans(values: dict, pids: list[int] | None, rounds: int, threads: int, barrier=None) -> list[tuple[float, float]]:
    """(start, end) monotonic times of each round's local training of ``pids`` (None: every client), in turn."""
    from client.task import load_site, train_round
    from detection.model import build_model
    from server.config import RunConfig
    from server.plan import build_plan
    from strategies.protocol import RoundInstructions

    cfg = RunConfig.from_run_config(values)
    plan = build_plan(cfg.method, cfg.warmup_epochs, cfg.phase1_rounds, cfg.phase2_rounds, cfg.server_epochs, cfg.eval_every)
    torch.set_num_threads(threads)
    sites = [load_site(cfg.federation_path(), pid) for pid in (range(cfg.synthetic_clients) if pids is None else pids)]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(sites[0].class_names), list(sites[0].class_names))
    spans = []
    for step in [s for s in plan.steps if s.clients][:rounds]:
        ins = RoundInstructions.for_round(cfg, server_round=step.round, phase=step.phase_name, trainable=step.phase.client_groups,
                                          upload=step.phase.upload_groups, ortho_lambda=0.0, evaluate_personal=False,
                                          federation=str(cfg.federation_path()), run_key="floor")
        if barrier is not None:
            barrier.wait()  # every process starts the round together, as the simulation's actors do
        t0 = time.monotonic()
        for site in sites:
            train_round(copy.deepcopy(model), site, ins, None, "cpu")
        spans.append((t0, time.monotonic()))
    return spans


def floor_rounds(values: dict, rounds: int, threads: int) -> list[float]:
    """Seconds of each round's local training, every client in turn in this process on ``threads`` threads."""
    return [end - start for start, end in _floor_spans(values, None, rounds, threads)]


def _parallel_worker(values, pids, rounds, barrier, results) -> None:
    results.put(_floor_spans(values, pids, rounds, 1, barrier))


def parallel_floor_rounds(values: dict, rounds: int, processes: int, clients: int) -> list[float]:
    """Seconds of each round with the clients dealt over ``processes`` one-thread processes, no Flower, no Ray.

    The simulation's own parallelism (one-CPU actors working side by side) without its messaging:
    a round lasts from the common start to the last process's end.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_parallel_worker, args=(values, list(range(i, clients, processes)), rounds, barrier, results))
               for i in range(processes)]
    for w in workers:
        w.start()
    spans = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return [max(s[r][1] for s in spans) - min(s[r][0] for s in spans) for r in range(rounds)]


def breakdown(row: dict, actors: int) -> dict:
    """Where one simulated round's time goes (seconds)."""
    parts = row["seconds_by_part"]
    clients = row["clients"].values()
    setup = sum(c.get("setup_seconds", 0.0) for c in clients) / actors
    train = sum(c.get("train_seconds", 0.0) for c in clients) / actors
    client_other = sum(c["client_seconds"] - c.get("setup_seconds", 0.0) - c.get("train_seconds", 0.0) for c in clients) / actors
    out = {f"server {k}": parts.get(k, 0.0) for k in SERVER_PARTS}
    out.update({"client set-up": setup, "client training": train, "client other": client_other,
                "flower + ray (messages, waiting)": parts.get("exchange", 0.0) - setup - train - client_other})
    return out


def run_size(clients: int, args, work: Path, console: Console) -> dict:
    manifest, fed_keys = same_work_federation(work, clients, args.images_per_client, 16, 24)
    out = work / f"run-{clients}"
    shutil.rmtree(out, ignore_errors=True)
    values = run_values(manifest, fed_keys, args.rounds, out)
    overrides = {k: v for k, v in values.items() if k not in ("method", "output-dir")}
    console.print(f"{clients} clients: floor ({args.actors} threads, one process)")
    floor = floor_rounds(values, args.rounds, args.actors)
    console.print(f"{clients} clients: parallel floor ({args.actors} one-thread processes)")
    parallel = parallel_floor_rounds(values, args.rounds, args.actors, clients)
    console.print(f"{clients} clients: simulation ({args.actors} actors of 1 CPU)")
    done, wall = fedsto_run("smoke", "ssfl", out, clients, overrides, port=args.port, log=work / f"run-{clients}.log",
                            extra_flags=("--cpus-per-client", "1"))
    if done.returncode != 0:
        raise SystemExit(f"{clients} clients: fedsto run exited with {done.returncode}; see {work / f'run-{clients}.log'}")
    rows = [r for r in read_rows(out / "ssfl") if r.get("sampled")]
    sim = [r["seconds"] - r["seconds_by_part"].get("evaluation", 0.0) for r in rows]
    steady, floor_steady, parallel_steady = (statistics.median(x[1:]) for x in (sim, floor, parallel))
    parts = [breakdown(r, args.actors) for r in rows[1:]]
    median_parts = {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}
    evaluation = sum(r["seconds_by_part"].get("evaluation", 0.0) for r in rows)
    return {"clients": clients, "rounds": len(rows), "images_per_client": args.images_per_client,
            "sim_round_seconds": [round(s, 3) for s in sim], "floor_round_seconds": [round(s, 3) for s in floor],
            "parallel_floor_round_seconds": [round(s, 3) for s in parallel],
            "sim_median_seconds": round(steady, 3), "floor_median_seconds": round(floor_steady, 3),
            "parallel_floor_median_seconds": round(parallel_steady, 3),
            "ratio": round(steady / floor_steady, 3), "ratio_parallel": round(steady / parallel_steady, 3), "first_round_seconds": round(sim[0], 2),
            "startup_seconds": round(wall - sum(r["seconds"] for r in rows), 1), "evaluation_seconds": round(evaluation, 2),
            "wall_seconds": round(wall, 1), "breakdown_median_seconds": median_parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images-per-client", type=int, default=16)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1,
                        help="Ray actors of one CPU each; the floor uses as many threads (default: the CPUs)")
    parser.add_argument("--port", type=int, default=39395)
    parser.add_argument("--out", default=str(HERE / "results" / "sim_overhead.json"))
    args = parser.parse_args(argv)

    console = Console(highlight=False, width=160)
    work = work_folder("sim-overhead")
    sizes = [run_size(int(n), args, work, console) for n in args.clients.split(",")]

    table = Table(title=f"Simulation vs compute floor per round (SSFL, {args.images_per_client} images/client at 64 px, "
                        f"batch 8, {args.actors} CPUs; median of rounds 2..{args.rounds})")
    for col in ("clients", "floor s", "sim s", "ratio", f"parallel floor s ({args.actors} procs)", "ratio to it",
                "round 1 s", "start-up s"):
        table.add_column(col, justify="right")
    for s in sizes:
        table.add_row(str(s["clients"]), f"{s['floor_median_seconds']:.2f}", f"{s['sim_median_seconds']:.2f}",
                      f"{s['ratio']:.2f}", f"{s['parallel_floor_median_seconds']:.2f}", f"{s['ratio_parallel']:.2f}",
                      f"{s['first_round_seconds']:.1f}", f"{s['startup_seconds']:.0f}")
    console.print(table)
    parts = Table(title="Where a simulated round goes (seconds, median of rounds 2..; client parts shared over the actors)")
    parts.add_column("part")
    for s in sizes:
        parts.add_column(f"{s['clients']} clients", justify="right")
    for key in sizes[0]["breakdown_median_seconds"]:
        parts.add_row(key, *(f"{s['breakdown_median_seconds'][key]:.3f}" for s in sizes))
    parts.add_row("floor (one process)", *(f"{s['floor_median_seconds']:.3f}" for s in sizes))
    parts.add_row(f"parallel floor ({args.actors} processes)", *(f"{s['parallel_floor_median_seconds']:.3f}" for s in sizes))
    console.print(parts)
    result = {"benchmark": "sim_overhead", "settings": {k: v for k, v in vars(args).items() if k != "out"}, "sizes": sizes}
    return finish(console, "benchmarks.sim_overhead", argv, result, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
