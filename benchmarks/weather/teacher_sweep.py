"""How many pseudo labels would a teacher give at each tau_high, and how good are they?

The weather benchmark's teacher check reports one threshold (the preset's ``tau-high``). This
sweep runs a model (a warm-up from the warm-up cache, or a row's ``model.pt``) as the round-1
teacher over every client's images and the server domain's test split (weak view, NMS at
``--nms-conf``/IoU 0.65, one class per box, as the clients do) and splits its boxes at several
``tau_high``: boxes per image, and precision and recall against the hidden labels (diagnostics
only; the clients never see them).

    python -m benchmarks.weather.teacher_sweep --warmup-of fedsto      # the warm-up a recorded row used
    python -m benchmarks.weather.teacher_sweep --model runs/x/model.pt --name x

Prints a table per client and writes ``benchmarks/weather/results/<scale>/sweeps/teacher_sweep-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.weather.rows import SCALES
from detection.images import LetterboxCache
from detection.metrics import NmsConfig, predict_records
from detection.model import build_model
from detection.pseudo_labels import count_pseudo_boxes, pseudo_box_quality, split_pseudo_labels
from detection.sites import load_client_site, load_server_site

TAUS = (0.6, 0.5, 0.4, 0.3, 0.2)


def load_model_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a warm-up cache entry, a run checkpoint or an Ultralytics-style ``model.pt``, and which it was."""
    entry = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(entry, dict) and "checkpoint" in entry:
        return entry["checkpoint"]["model_state"], "warm-up"
    if isinstance(entry, dict) and "model_state" in entry:
        return entry["model_state"], "checkpoint"
    model = entry["model"] if isinstance(entry, dict) and "model" in entry else entry
    return (model.float().state_dict() if isinstance(model, torch.nn.Module) else dict(model)), "model"


def sweep_client(model: torch.nn.Module, records: list, imgsz: int, taus: tuple[float, ...], nms_conf: float,
                 tau_low: float = 0.1) -> dict[float, dict[str, float]]:
    """Reliable boxes per image, precision and recall at each ``tau_high`` (one prediction pass)."""
    cache = LetterboxCache(imgsz)
    preds = predict_records(model, records, imgsz, nms=NmsConfig(conf=nms_conf, iou=0.65, multi_label=False), cache=cache)
    out = {}
    for tau in taus:
        sums: dict[str, float] = {}
        for record, det in zip(records, preds):
            split = split_pseudo_labels(det, imgsz, min(tau_low, tau), tau)
            for key, value in count_pseudo_boxes(split, record.classes, cache.boxes(record.path, record.boxes)).items():
                sums[key] = sums.get(key, 0.0) + value
        n = max(1, len(records))
        quality = pseudo_box_quality(sums)
        out[tau] = {"reliable_per_image": sums.get("pseudo_reliable", 0.0) / n, "true_per_image": sums["true_boxes"] / n,
                    "precision": quality["pseudo_reliable_precision"], "recall": quality["pseudo_reliable_recall"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--warmup-of", metavar="ROW", help="the warm-up cache entry a recorded row used")
    which.add_argument("--model", type=Path, help="warm-up cache entry, run checkpoint or model.pt")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--federation", type=Path, default=None, help="federation.json (default: the benchmark's)")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--model-yaml", default="yolo11n.yaml")
    parser.add_argument("--nms-conf", type=float, default=0.1)
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    parser.add_argument("--max-images", type=int, default=0, help="per client (0: all)")
    parser.add_argument("--name", default=None, help="result name (default: warmup-<row>, or the model's folder name)")
    parser.add_argument("--about", default="", help="one line on what the model is, for RESULTS.md")
    args = parser.parse_args(argv)
    console = Console()
    from benchmarks.weather.__main__ import build_federation, recipe_version, recorded, results_dir
    from detection.ultralytics_env import fedsto_home

    if args.warmup_of:
        key = (recorded(args.scale).get(args.warmup_of, {}).get("warmup_cache") or {}).get("key")
        if key is None:
            console.print(f"[red]row {args.warmup_of!r} is not recorded at scale {args.scale}, "
                          "or used no cached warm-up[/red]")
            return 2
        args.model = fedsto_home() / "warmups" / key / "warmup.pt"
        args.name = args.name or f"warmup-{args.warmup_of}"
    if not args.model.is_file():
        console.print(f"[red]no such model file: {args.model}[/red]")
        return 2
    manifest = args.federation or build_federation(fedsto_home())
    torch.set_num_threads(1)
    start = time.perf_counter()
    server = load_server_site(manifest)
    # The server domain's test split (never trained on) is the reference: what the same teacher
    # finds on images like the ones it learnt from.
    sets = {f"{server.server_domain} (test split, reference)": server.tests[server.server_domain]}
    for pid in range(server.num_clients):
        site = load_client_site(manifest, pid)
        if site.hidden is None:
            console.print(f"[red]client {pid} has no hidden labels (a deployed site): nothing to measure[/red]")
            return 2
        sets[f"{site.domain} (client {pid})"] = site.hidden
    model = build_model(args.model_yaml, len(server.class_names), server.class_names)
    state, kind = load_model_state(args.model)
    model.load_state_dict(state)
    results = {}
    for label, records in sets.items():
        records = records[:args.max_images] if args.max_images else records
        swept = sweep_client(model, records, args.imgsz, tuple(args.taus), args.nms_conf)
        results[label] = {str(t): v for t, v in swept.items()}
        results[label]["images"] = len(records)
    for domain, rows in results.items():
        true = rows[str(args.taus[0])]["true_per_image"]
        table = Table(title=f"{domain}: {rows['images']} images, {true:.2f} true boxes/img")
        for col in ("tau_high", "reliable/img", "precision", "recall"):
            table.add_column(col, justify="right")
        for tau in args.taus:
            r = rows[str(tau)]
            table.add_row(f"{tau:.2f}", f"{r['reliable_per_image']:.2f}", f"{r['precision']:.2f}", f"{r['recall']:.3f}")
        console.print(table)
    name = args.name or args.model.parent.name
    out = results_dir(args.scale) / "sweeps" / f"teacher_sweep-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.weather.teacher_sweep", *(argv if argv is not None else sys.argv[1:])])
    # The recipe of the code that measured (its letterbox decides the pixels the model sees).
    out.write_text(json.dumps({"command": command, "model": str(args.model), "kind": kind, "about": args.about,
                               "recipe": recipe_version(),
                               "nms_conf": args.nms_conf, "imgsz": args.imgsz,
                               "seconds": round(time.perf_counter() - start, 1), "clients": results}, indent=1) + "\n")
    console.print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
