"""Per-round time and peak memory of the Ray simulation at 10, 100 and 1,000 clients, 10 sampled per round.

Every size gets the same work: each client holds ``--images-per-client`` synthetic images, the
server the same ``--server-images`` labelled images and every domain the same test split, so a
round (10 clients training, one server epoch) costs the same whatever the federation's size; what
grows is only the number of clients that exist. The run is a real ``fedsto run`` (FedSTO, phase 1
then phase 2, no warm-up) with ``num-supernodes`` = clients and one CPU per client.

Memory is the peak of the PSS summed over every process of the run (``benchmarks/simrun.py``).
Per-round time is the median over the client rounds of the ``seconds`` the ServerApp logs (pick,
send, train, aggregate, server epoch); the command's wall time adds Ray's start-up, the partition
query of every node and the final evaluation.

    python -m benchmarks.sim_scale                       # 10, 100, 1000 clients
    python -m benchmarks.sim_scale --clients 10,1000 --rounds 4

Prints a table and writes ``benchmarks/results/sim_scale.json``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.simrun import PssMonitor, fedsto_run, finish, mib, read_rows, work_folder

HERE = Path(__file__).resolve().parent
WEATHERS = ("rainy", "night")


def federation_settings(clients: int, images_per_client: int, server_images: int, test_images: int) -> dict:
    """Synthetic federation run-config keys that give every client ``images_per_client`` images.

    The builder splits ``synthetic-images`` into test, server and client images by fractions; the
    fractions are chosen so the server and test counts stay fixed as the clients grow.
    """
    train = clients * images_per_client + server_images
    total = train + test_images
    return {"synthetic-images": total, "synthetic-clients": clients, "synthetic-imgsz": 64,
            "synthetic-weathers": ",".join(WEATHERS), "synthetic-test-fraction": round(test_images / total, 8),
            "synthetic-server-fraction": round(server_images / train, 8)}


def same_work_federation(work: Path, clients: int, images_per_client: int, server_images: int,
                         test_images: int) -> tuple[Path, dict]:
    """``(manifest, run-config keys)`` of a synthetic federation of :func:`federation_settings`, built if missing."""
    from server.prepare import ensure_synthetic_federation

    fed_keys = federation_settings(clients, images_per_client, server_images, test_images)
    manifest = work / f"federation-{clients}" / "federation.json"
    ensure_synthetic_federation(manifest, num_images=fed_keys["synthetic-images"], imgsz=64, num_clients=clients,
                                weathers=WEATHERS, server_fraction=fed_keys["synthetic-server-fraction"],
                                test_fraction=fed_keys["synthetic-test-fraction"], seed=0)
    return manifest, fed_keys


def run_size(clients: int, args, work: Path, console: Console) -> dict:
    from detection.manifest_reader import Federation
    from server.presets import toml_value

    t0 = time.perf_counter()
    manifest, fed_keys = same_work_federation(work, clients, args.images_per_client, args.server_images, args.test_images)
    build_seconds = time.perf_counter() - t0
    fed = Federation.load(manifest)
    per_client = sorted({len(fed.client_images(p)) for p in range(fed.num_clients)})
    overrides = {"federation": str(manifest), **fed_keys, "fraction-train": round(args.per_round / clients, 8),
                 "warmup-epochs": 0, "phase1-rounds": 1, "phase2-rounds": args.rounds - 1, "eval-every": 1000,
                 "eval-personal": False, "teacher-check-clients": args.per_round, "imgsz": 64, "batch-size": 8,
                 "discovery-timeout": 600.0, "round-timeout": 1800.0, "progress": False}
    out = work / f"run-{clients}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log = work / f"run-{clients}.log"
    console.print(f"{clients} clients ({per_client} images each, {len(fed.server_records())} server, "
                  f"{sum(len(v) for v in fed.test_records().values())} test): running, log {log}")
    with PssMonitor(interval=args.interval) as monitor:
        done, wall = fedsto_run("smoke", "fedsto", out, clients, overrides, port=args.port, log=log)
    if done.returncode != 0:
        raise SystemExit(f"{clients} clients: fedsto run exited with {done.returncode}; see {log}")
    rows = [r for r in read_rows(out / "fedsto") if r.get("sampled")]
    seconds = [r["seconds"] for r in rows]
    return {"clients": clients, "sampled_per_round": len(rows[0]["sampled"]), "images_per_client": per_client,
            "rounds": len(rows), "round_seconds": seconds, "median_round_seconds": round(statistics.median(seconds), 2),
            "wall_seconds": round(wall, 1), "federation_build_seconds": round(build_seconds, 1),
            "peak_pss_mib": mib(monitor.peak), "peak_breakdown_mib": {k: mib(v) for k, v in sorted(monitor.peak_breakdown.items())},
            "peak_processes": monitor.peak_processes, "memory_samples": monitor.samples,
            "command": shlex.join(["fedsto", "run", "--preset", "smoke", "--method", "fedsto", "--clients", str(clients), "--",
                                   *(f"{k}={toml_value(k, v)}" for k, v in overrides.items() if k != "federation")])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated federation sizes")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=3, help="client rounds (1 in phase 1, the rest in phase 2)")
    parser.add_argument("--images-per-client", type=int, default=4)
    parser.add_argument("--server-images", type=int, default=16)
    parser.add_argument("--test-images", type=int, default=24)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--port", type=int, default=39391, help="local SuperLink port of the benchmark's runs")
    parser.add_argument("--out", default=str(HERE / "results" / "sim_scale.json"))
    args = parser.parse_args(argv)

    console = Console(highlight=False, width=160)
    work = work_folder("sim-scale")
    sizes = [run_size(int(n), args, work, console) for n in args.clients.split(",")]

    table = Table(title=f"Ray simulation at scale: {args.per_round} clients per round, same work per round")
    for col in ("clients", "images/client", "rounds", "median s/round", "wall s", "peak PSS MiB", "vs smallest",
                "actors MiB", "ray daemons MiB", "flower MiB", "processes"):
        table.add_column(col, justify="right")
    base = sizes[0]["peak_pss_mib"]
    for s in sizes:
        b = s["peak_breakdown_mib"]
        table.add_row(str(s["clients"]), ",".join(map(str, s["images_per_client"])), str(s["rounds"]),
                      f"{s['median_round_seconds']:.2f}", f"{s['wall_seconds']:.0f}", f"{s['peak_pss_mib']:.0f}",
                      f"{s['peak_pss_mib'] / base:.2f}x", f"{b.get('ray actors', 0):.0f}", f"{b.get('ray daemons', 0):.0f}",
                      f"{b.get('flower', 0):.0f}", str(s["peak_processes"]))
    console.print(table)
    result = {"benchmark": "sim_scale", "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "peak_pss_ratio_largest_to_smallest": round(sizes[-1]["peak_pss_mib"] / base, 3), "sizes": sizes}
    return finish(console, "benchmarks.sim_scale", argv, result, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
