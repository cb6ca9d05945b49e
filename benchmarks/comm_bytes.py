"""Bytes on the wire per client per round: FedSTO phase 1 (backbone up) vs full rounds, fp32 vs compressed.

The bytes are those of the packed records the ServerApp and the ClientApp exchange
(``strategies/transport.py``: one array per message), computed by packing the real state dict of
each model with the real upload keys of each phase (FedAvg; FedBN would keep its BatchNorm home).
A round moves one broadcast down and one reply up per sampled client; the metrics rows of every
run say the same (``bytes_down``, ``bytes_up``).

With ``--runs`` it also measures what compression does to mAP: the demo's FedSTO run (3 clients,
warm-up reused from the cache) once per transport, same seed, and prints Total mAP50 side by side.

    python -m benchmarks.comm_bytes                       # bytes only (seconds)
    python -m benchmarks.comm_bytes --runs                # plus one demo FedSTO run per transport

Prints a table and writes ``benchmarks/results/comm_bytes.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flwr.app import ArrayRecord
from rich.console import Console
from rich.table import Table

from benchmarks.simrun import finish

HERE = Path(__file__).resolve().parent
MODELS = ("yolo11n.yaml", "yolov8s.yaml")


def round_bytes(model_yaml: str, encoding: str) -> dict[str, dict[str, int]]:
    """Phase -> {"down", "up"} bytes of one client in one round."""
    import torch

    from detection.model import build_model, get_state
    from server.plan import PHASES
    from strategies import get_strategy
    from strategies.transport import as_base, pack_arrays, unpack_arrays

    model = build_model(model_yaml, 5, [str(i) for i in range(5)])
    strategy = get_strategy("fedavg", "")
    state = get_state(model)
    down, layout = pack_arrays(ArrayRecord(state), encoding)
    base = as_base(unpack_arrays(down, layout))
    out = {}
    for phase in ("phase1", "phase2"):
        keys = strategy.upload_keys(model, PHASES[phase].upload_groups)
        # a trained client's weights: the broadcast plus a small update
        trained = {k: state[k] + 1e-3 * torch.randn_like(state[k]) if state[k].is_floating_point() else state[k] for k in keys}
        up, _ = pack_arrays(ArrayRecord(trained), encoding, base)
        out[phase] = {"down": down.count_bytes(), "up": up.count_bytes(), "tensors_up": len(keys)}
    return out


def demo_runs(encodings: list[str], console: Console) -> dict[str, dict]:
    """Total mAP50 of the demo's FedSTO run per transport (warm-up from the cache)."""
    from benchmarks.simrun import fedsto_run, read_rows, work_folder

    work = work_folder("comm-bytes")
    out = {}
    for encoding in encodings:
        folder = work / encoding
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        console.print(f"demo fedsto with transport={encoding} ...")
        done, wall = fedsto_run("demo", "fedsto", folder, 3, {"transport": encoding}, log=work / f"{encoding}.log")
        if done.returncode != 0:
            raise SystemExit(f"transport={encoding}: fedsto run exited with {done.returncode}; see {work / f'{encoding}.log'}")
        result = json.loads((folder / "fedsto" / "result.json").read_text())
        rows = [r for r in read_rows(folder / "fedsto") if r.get("sampled")]
        out[encoding] = {"total_map50": result["final"]["Total"]["map50"],
                         "per_domain_map50": {d: v["map50"] for d, v in result["final"].items()},
                         "bytes_down": sum(r["bytes_down"] for r in rows), "bytes_up": sum(r["bytes_up"] for r in rows),
                         "wall_seconds": round(wall, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.comm_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", action="store_true", help="also run the demo's FedSTO once per transport (minutes each)")
    parser.add_argument("--out", default=str(HERE / "results" / "comm_bytes.json"))
    args = parser.parse_args(argv)

    from strategies.transport import ENCODINGS

    console = Console(highlight=False, width=160)
    sizes = {m: {e: round_bytes(m, e) for e in ENCODINGS} for m in MODELS}
    table = Table(title="MB per client per round (broadcast down / reply up), FedAvg upload keys")
    for col in ("model", "transport", "phase 1 down", "phase 1 up", "phase 2 down", "phase 2 up", "phase 1 up vs phase 2",
                "vs fp32"):
        table.add_column(col, justify="right")
    for m, per in sizes.items():
        for e, b in per.items():
            ref = per["fp32"]
            table.add_row(m, e, *(f"{b[p][d] / 1e6:.2f}" for p in ("phase1", "phase2") for d in ("down", "up")),
                          f"{b['phase1']['up'] / b['phase2']['up']:.2f}",
                          f"{(b['phase2']['down'] + b['phase2']['up']) / (ref['phase2']['down'] + ref['phase2']['up']):.2f}")
    console.print(table)
    result = {"benchmark": "comm_bytes", "bytes_per_client_round": sizes}
    if args.runs:
        runs = demo_runs(list(ENCODINGS), console)
        from server.presets import preset_path, read_preset

        demo = read_preset(preset_path("demo", HERE.parent))
        runs_table = Table(title=f"Demo FedSTO (3 clients, {demo['phase1-rounds']} + {demo['phase2-rounds']} rounds) per "
                                 "transport: mAP50 and bytes of the whole run")
        for col in ("transport", "Total mAP50", "MB down", "MB up", "wall s"):
            runs_table.add_column(col, justify="right")
        for e, r in runs.items():
            runs_table.add_row(e, f"{r['total_map50']:.3f}", f"{r['bytes_down'] / 1e6:.1f}", f"{r['bytes_up'] / 1e6:.1f}",
                               f"{r['wall_seconds']:.0f}")
        console.print(runs_table)
        result["demo_runs"] = runs
    return finish(console, "benchmarks.comm_bytes", argv, result, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
