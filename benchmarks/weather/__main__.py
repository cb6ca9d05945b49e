"""The weather benchmark: does FedSTO show the paper's effect on real road images?

Data: ``../shared/data/highway`` (2,442 real labelled clear-weather road images). The server holds
the labels of 25% of the training images (clear); three clients hold disjoint unlabelled images
turned foggy, night and snowy by the project's weather transforms (the three that read most like
real weather in ``benchmarks/weather/montage.jpg``); each domain has a labelled test split that
is never trained on. Every row is one real ``fedsto run`` (Flower's Ray simulation) with the
``weather`` preset; all rows but ``full`` share one warm-up, trained by the first of them and
reused from the warm-up cache.

Runs in pieces: each row is one command of at most ``--piece-minutes`` (45); a row that is
stopped then, or by Ctrl-C, continues from its last checkpoint when the command runs again. Results are small JSON files under ``benchmarks/weather/results/<scale>/``
(committed; weights never); after each row ``RESULTS.md`` and the plots are rewritten from all of
them. A row is redone only when its configuration changed (preset, row settings, federation or
training recipe).

    python -m benchmarks.weather                          # every row not yet recorded, in priority order
    python -m benchmarks.weather --rows partial,fedsto    # rows or groups (priority, strategies, seeds, ablations)
    python -m benchmarks.weather --max-rows 1             # one row, then stop (a 45-minute piece)
    python -m benchmarks.weather --list                   # which rows are recorded
    python -m benchmarks.weather --report                 # rewrite RESULTS.md and the plots only
    python -m benchmarks.weather --scale paper            # 640 px, YOLOv5-L, the paper's schedule: a GPU host
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.weather.rows import ROWS, SCALES, Row, rows_named

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data" / "highway"
WEATHERS = ("foggy", "night", "snowy")
NUM_CLIENTS = 3
# Federation settings: fixed, so every row (and every later session) uses the same split.
FEDERATION = {"server_fraction": 0.25, "test_fraction": 0.165, "seed": 0, "num_clients": NUM_CLIENTS,
              "weathers": list(WEATHERS)}


def results_dir(scale: str) -> Path:
    return HERE / "results" / scale


def build_federation(home: Path) -> Path:
    """The benchmark's federation under ``$FEDSTO_HOME/federations/weather-highway`` (built once)."""
    from detection.federation import build_federation as build
    from detection.yolo import read_yolo_dataset

    manifest = home / "federations" / "weather-highway" / "federation.json"
    if manifest.is_file():
        return manifest
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the highway images are not there (they come with ../shared/data)")
    records, class_names, _ = read_yolo_dataset(DATA / "data.yaml")
    return build(records, class_names, manifest.parent, domain_rule="weather", **FEDERATION)


def recipe_version() -> int:
    """:data:`detection.train.RECIPE_VERSION`, the training code's behaviour a row ran with."""
    from detection.train import RECIPE_VERSION

    return RECIPE_VERSION


def config_hash(scale: str, row: Row, manifest: Path) -> str:
    """What decides a row's result: the preset file, the row, the federation and the training recipe."""
    from server.warmup_cache import file_sha256

    preset = ROOT / "presets" / f"{SCALES[scale].preset}.toml"
    parts = {"preset": preset.read_text(), "row": [row.method, sorted(row.run_config.items())],
             "federation": file_sha256(manifest), "recipe": recipe_version(), "clients": NUM_CLIENTS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fedsto_command(scale: str, row: Row, manifest: Path, out: Path, resume: Path | None, piece_minutes: float = 0) -> list[str]:
    exe = Path(sys.executable).with_name("fedsto")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
    if piece_minutes:
        head = [*head, "run", "--timeout", f"{piece_minutes * 60:.0f}"]
    else:
        head = [*head, "run"]
    if resume is not None:
        return [*head, "--resume", str(resume)]
    overrides = [f"{k}={v}" for k, v in {**row.run_config, "federation": str(manifest)}.items()]
    return [*head, "--preset", SCALES[scale].preset, "--method", row.method, "--clients", str(NUM_CLIENTS),
            *SCALES[scale].flags, "--out", str(out), "--", *overrides]


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def versions() -> dict:
    import flwr
    import torch
    import ultralytics

    return {"torch": torch.__version__, "flwr": flwr.__version__, "ultralytics": ultralytics.__version__}


def ultralytics_val_per_domain(model: Path, manifest: Path, imgsz: int) -> dict[str, float]:
    """``YOLO(model).val(data=<domain's test split>, imgsz=imgsz)`` mAP50 for every domain."""
    from detection.manifest_reader import Federation
    from detection.ultralytics_val import ultralytics_val, write_yolo_split

    fed = Federation.load(manifest)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for domain, records in fed.test_records().items():
            data = write_yolo_split(records, Path(tmp) / domain, fed.class_names)
            out[domain] = ultralytics_val(model, data, imgsz, Path(tmp) / f"val-{domain}")["map50"]
    return out


def summarise_run(run_dir: Path) -> dict:
    """What RESULTS.md needs from a finished run dir."""
    result = json.loads((run_dir / "result.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"step": r["step"], "round": r["round"], "kind": r["kind"], "total_map50": r["eval"]["Total"]["map50"]}
             for r in rows if "eval" in r]
    pseudo = [{"round": r["round"], **{k: r["pseudo"][k] for k in ("reliable_per_image", "reliable_precision",
                                                                     "reliable_recall") if k in r["pseudo"]}}
              for r in rows if "pseudo" in r]
    teacher = next((r["teacher_check"] for r in rows if "teacher_check" in r), None)
    personal = next((r["personal"] for r in reversed(rows) if r.get("personal")), None)
    return {"final": result["final"], "status": result["status"], "elapsed_seconds": result["elapsed_seconds"],
            "warmup_cache": result.get("warmup_cache"), "failures": result.get("failures"), "curve": curve,
            "pseudo": pseudo, "teacher_check": teacher, "personal": personal}


def run_row(scale: str, row: Row, manifest: Path, work: Path, console, piece_minutes: float = 0) -> dict | None:
    """Run (or resume) one row for at most ``piece_minutes``; its record, or None when it did not finish."""
    from server.config import RunConfig

    out = work / row.name
    run_dir = out / row.method
    pieces_file = out / "pieces.json"  # wall seconds of each piece of this row
    resume = run_dir if (run_dir / "checkpoints").is_dir() and not (run_dir / "model.pt").is_file() else None
    if resume is None and out.exists():
        shutil.rmtree(out)  # a finished run of an older config, or one that never checkpointed
    command = fedsto_command(scale, row, manifest, out, resume, piece_minutes)
    console.print(f"[bold]{row.name}[/bold]: {shlex.join(command)}")
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT)
    pieces = (json.loads(pieces_file.read_text()) if pieces_file.is_file() else []) + [round(time.perf_counter() - t0, 1)]
    out.mkdir(parents=True, exist_ok=True)
    pieces_file.write_text(json.dumps(pieces) + "\n")
    seconds = sum(pieces)
    if done.returncode != 0 or not (run_dir / "model.pt").is_file():
        console.print(f"[red]{row.name}: not finished (fedsto run exited with {done.returncode}); run the same "
                      f"command again to continue it from its last checkpoint[/red]")
        return None
    cfg = json.loads((run_dir / "config.json").read_text())["run_config"]
    imgsz = RunConfig.from_run_config(cfg).imgsz
    return {"row": row.name, "family": row.family, "group": row.group, "method": row.method, "strategy": row.strategy,
            "strategy_options": row.strategy_options, "seed": row.seed, "overrides": dict(row.overrides),
            "command": shlex.join(fedsto_command(scale, row, manifest, out, None)), "wall_seconds": round(seconds, 1),
            "pieces": len(pieces),
            "finished": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware(), "versions": versions(), "imgsz": imgsz,
            **summarise_run(run_dir), "ultralytics_val_map50": ultralytics_val_per_domain(run_dir / "model.pt", manifest, imgsz)}


def recorded(scale: str, sub: str = "") -> dict[str, dict]:
    """Recorded row results (or, with ``sub="sweeps"``, teacher sweeps) by name."""
    folder = results_dir(scale) / sub
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weather", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--rows", default="", help="comma-separated rows or groups (default: all, in order)")
    parser.add_argument("--max-rows", type=int, default=0, help="stop after this many rows were run (0: no limit)")
    parser.add_argument("--piece-minutes", type=float, default=45.0,
                        help="stop a row after this many minutes, resumable by the same command (0: no limit)")
    parser.add_argument("--list", action="store_true", help="show which rows are recorded and stop")
    parser.add_argument("--report", action="store_true", help="rewrite RESULTS.md and the plots only")
    args = parser.parse_args(argv)

    from rich.console import Console

    from detection.ultralytics_env import fedsto_home

    console = Console(highlight=False, soft_wrap=True)
    home = fedsto_home()
    manifest = build_federation(home)
    have = recorded(args.scale)
    wanted = rows_named(args.rows)
    todo = [r for r in wanted if have.get(r.name, {}).get("config_hash") != config_hash(args.scale, r, manifest)]
    if args.list:
        for r in ROWS:
            state = "to run" if r in todo else ("recorded" if r.name in have else "not selected")
            console.print(f"  {r.name:<22} {r.group:<11} {state}")
        return 0
    ran = 0
    for row in [] if args.report else todo:
        if args.max_rows and ran >= args.max_rows:
            break
        stamp = config_hash(args.scale, row, manifest)  # before the run: what it ran with
        record = run_row(args.scale, row, manifest, home / "bench" / f"weather-{args.scale}", console, args.piece_minutes)
        ran += 1
        if record is None:
            return 1
        record["config_hash"] = stamp
        record["recipe"] = recipe_version()
        folder = results_dir(args.scale)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        report(args.scale, manifest, console)
    if args.report or not ran:
        report(args.scale, manifest, console)
    return 0


def report(scale: str, manifest: Path, console) -> Path:
    """RESULTS.md from every recorded row, marking those whose configuration changed since."""
    from benchmarks.weather.report import write_report

    have = recorded(scale)
    stale = frozenset(r.name for r in ROWS if r.name in have and have[r.name].get("config_hash") != config_hash(scale, r, manifest))
    return write_report(scale, have, manifest, console, stale=stale, sweeps=recorded(scale, "sweeps"),
                        recipe=recipe_version())


if __name__ == "__main__":
    sys.exit(main())
