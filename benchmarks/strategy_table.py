"""Every aggregation strategy through a short FedSTO run (and the adaptive ones under SSFL): completed, Total mAP50, seconds.

One synthetic weather federation with 7 clients (Bulyan's ``4f + 3`` with ``f = 1``), one warm
start for all (``fedsto train --labels server`` on the server's labelled images), then for every
strategy the real ServerApp loop and ClientApp on the in-process grid (``server.inprocess``; the
same code Flower runs, without Ray, so the seconds are the training and aggregation, not process
start-up): ``--phase1-rounds`` + ``--phase2-rounds`` rounds, every client every round, one server
epoch between rounds, the final global model evaluated on every domain's test split. FedAdam is
also run at several ``eta`` values (the guidance in ``strategies/fedopt.py`` comes from this).

The runs are short and the test splits small (about 40 images per domain at the default size),
so differences of a few hundredths of mAP50 between strategies are noise; the table shows that
each strategy completes under each method and what it costs, not which one is best.

    python -m benchmarks.strategy_table                 # all rows; rerun to continue after a stop
    python -m benchmarks.strategy_table --only fedadam,fedbn

Prints a table and writes ``benchmarks/results/strategy_table.json``. Finished runs are kept
under ``--work`` (default ``$FEDSTO_HOME/bench/strategy-table``) and not redone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "strategy_table.json"
NUM_CLIENTS = 7

# (strategy, strategy-options, method): every strategy under fedsto, the adaptive ones under ssfl too,
# and FedAdam's eta sweep.
ADAPTIVE = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
OPTIONS = {"fedprox": "proximal-mu=0.01"}
RUNS = [*((s, OPTIONS.get(s, ""), "fedsto") for s in ("fedavg", "fedbn", "fedprox", *ADAPTIVE, "fedmedian",
                                                      "fedtrimmedavg", "krum", "multikrum", "bulyan", "fraug")),
        *((s, "", "ssfl") for s in ("fedavg", *ADAPTIVE)),
        *(("fedadam", f"eta={eta}", "fedsto") for eta in ("0.0001", "0.01", "0.1"))]


def run_name(strategy: str, options: str, method: str) -> str:
    return "-".join(filter(None, [method, strategy, options.replace("=", "").replace(" ", "-")]))


def prepare(work: Path, args) -> tuple[Path, Path]:
    """The federation (built once) and the warm start (trained once)."""
    from server.prepare import ensure_synthetic_federation

    manifest, _ = ensure_synthetic_federation(work / "federation" / "federation.json", num_images=args.images,
                                              imgsz=args.imgsz, num_clients=NUM_CLIENTS,
                                              weathers=["rainy", "snowy", "foggy", "night"], server_fraction=0.25,
                                              test_fraction=0.2)
    warm = work / "warm" / "model.pt"
    if not warm.exists():
        subprocess.run([sys.executable, "-m", "server.cli", "train", str(manifest), "--labels", "server", "--epochs",
                        str(args.warmup_epochs), "--imgsz", str(args.imgsz), "--batch", "16", "--eval-every", "0",
                        "--out", str(warm.parent)], cwd=ROOT, check=True)
    return manifest, warm


def run_one(strategy: str, options: str, method: str, manifest: Path, warm: Path, out: Path, args) -> dict:
    """One in-process run (or its stored result when it completed before)."""
    import client.app
    from server.config import RunConfig
    from server.inprocess import InProcessGrid
    from server.runner import FederatedRun, RunFailed

    result_file, seconds_file = out / "result.json", out / "bench_seconds.txt"
    if result_file.exists() and seconds_file.exists():
        stored = json.loads(result_file.read_text())
        if stored.get("status") == "completed":
            return {**stored, "bench_seconds": float(seconds_file.read_text())}
    cfg = RunConfig.from_run_config({
        "method": method, "strategy": strategy, "strategy-options": options, "federation": str(manifest),
        "synthetic-images": 0, "weights": str(warm), "imgsz": args.imgsz, "batch-size": 16, "warmup-epochs": 0,
        "phase1-rounds": args.phase1_rounds, "phase2-rounds": args.phase2_rounds,
        "eval-every": args.phase1_rounds + args.phase2_rounds, "ema-decay": "0.999", "pseudo-mode": "ignore",
        "weak-teacher-map50": 0.0, "weak-teacher-density": 0.0, "eval-personal": False, "output-dir": str(out),
        "progress": False, "server-threads": args.threads, "client-threads": args.threads, "resume": str(out) if out.exists() else ""})
    t0 = time.perf_counter()
    try:
        result = FederatedRun(InProcessGrid(client.app.app, NUM_CLIENTS), cfg).run()
    except RunFailed as err:
        result = {"status": "failed", "error": str(err)}
    result["bench_seconds"] = time.perf_counter() - t0
    seconds_file.write_text(f"{result['bench_seconds']:.3f}\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="synthetic scenes of the federation")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--warmup-epochs", type=int, default=12)
    parser.add_argument("--phase1-rounds", type=int, default=1)
    parser.add_argument("--phase2-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated strategies (default: every row)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from detection.ultralytics_env import fedsto_home

    console = Console()
    command = shlex.join([sys.executable, "-m", "benchmarks.strategy_table", *(sys.argv[1:] if argv is None else argv)])
    console.print(f"[bold]command:[/bold] {command}")
    work = args.work or fedsto_home() / "bench" / "strategy-table"
    manifest, warm = prepare(work, args)
    wanted = set(filter(None, args.only.split(",")))
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else {}
    for strategy, options, method in RUNS:
        if wanted and strategy not in wanted:
            continue
        name = run_name(strategy, options, method)
        result = run_one(strategy, options, method, manifest, warm, work / "runs" / name, args)
        final = result.get("final", {})
        rows[name] = {"strategy": strategy, "options": options, "method": method, "status": result["status"],
                      "total_map50": final.get("Total", {}).get("map50"), "total_map50_95": final.get("Total", {}).get("map50_95"),
                      "seconds": result.get("bench_seconds"), "failures": result.get("failures"),
                      "rejections": len(result.get("rejections", [])), "error": result.get("error", "")}
        console.print(f"  {name}: {rows[name]['status']}, Total mAP50 {rows[name]['total_map50']}, "
                      f"{rows[name]['seconds'] or 0:.0f} s")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "torch": torch.__version__, "clients": NUM_CLIENTS,
                                        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out", "only")},
                                        "rows": rows}, indent=2) + "\n")

    table = Table(title=f"Strategies on a {NUM_CLIENTS}-client synthetic weather federation "
                        f"({args.phase1_rounds}+{args.phase2_rounds} rounds from one warm start, in-process grid)")
    for column in ("strategy", "options", "method", "completed", "Total mAP50", "mAP50-95", "seconds"):
        table.add_column(column, justify="left" if column in ("strategy", "options", "method") else "right", overflow="fold")
    for row in rows.values():
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        table.add_row(row["strategy"], row["options"] or "-", row["method"],
                      "yes" if row["status"] == "completed" else f"[red]{row['status']}[/red]",
                      fmt(row["total_map50"], ".3f"), fmt(row["total_map50_95"], ".3f"), fmt(row["seconds"], ".0f"))
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0 if all(r["status"] == "completed" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
