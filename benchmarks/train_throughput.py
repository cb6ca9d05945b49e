"""Steady-state training throughput: our supervised step vs Ultralytics' own trainer, same data and settings.

Both train yolo11n from its yaml on the same synthetic YOLO dataset, same image size, batch, SGD
and augmentation (horizontal flip + Ultralytics' default HSV jitter; mosaic, scale and translate
off on the Ultralytics side). Per-step times after ``--warmup`` steps are kept; set-up, data
caching and Ultralytics' final validation are outside the timed window. The raw floor is
forward + loss + backward + SGD step on one fixed in-memory batch. Medians of ``--repeats``.

    python benchmarks/train_throughput.py --imgsz 160 --batch 16 --steps 30 --repeats 3

Prints a table and writes ``benchmarks/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import detection  # noqa: F401  (offline Ultralytics settings)
from detection.model import build_model
from detection.synthetic import write_synthetic_dataset
from detection.train import TrainConfig, train_labelled
from detection.yolo import read_yolo_dataset
from ultralytics.utils.loss import v8DetectionLoss


def ours(records, names, args) -> float:
    """Images/s of ``train_labelled`` over ``args.steps`` steps after ``args.warmup`` untimed steps."""
    model = build_model(args.model, len(names), names)
    cfg = TrainConfig(imgsz=args.imgsz, batch_size=args.batch, device=args.device)
    train_labelled(model, records, cfg.replace(max_steps=args.warmup))  # caches images, warms kernels
    t0 = time.perf_counter()
    stats, _ = train_labelled(model, records, cfg.replace(max_steps=args.steps), seed_parts=(1,))
    return stats.images / (time.perf_counter() - t0)


def ultralytics_trainer(data_yaml: Path, args) -> float:
    """Images/s of Ultralytics' DetectionTrainer, timed per batch by its own callbacks."""
    from ultralytics import YOLO

    stamps: list[float] = []
    model = YOLO(args.model)
    model.add_callback("on_train_batch_end", lambda trainer: stamps.append(time.perf_counter()))
    with tempfile.TemporaryDirectory() as project:
        model.train(data=str(data_yaml), imgsz=args.imgsz, batch=args.batch, epochs=1, device=args.device, workers=0,
                    optimizer="SGD", lr0=0.01, momentum=0.937, warmup_epochs=0, mosaic=0.0, scale=0.0, translate=0.0,
                    fliplr=0.5, cache="ram", amp=False, plots=False, val=False, project=project, name="bench",
                    verbose=False, deterministic=False, fraction=min(1.0, (args.warmup + args.steps + 1) * args.batch / 1000))
    timed = stamps[args.warmup:args.warmup + args.steps + 1]
    if len(timed) < 2:
        raise RuntimeError(f"Ultralytics ran only {len(stamps)} batches")
    return (len(timed) - 1) * args.batch / (timed[-1] - timed[0])


def floor(names, args) -> float:
    """Images/s of forward + loss + backward + step on one fixed batch (no data work at all)."""
    model = build_model(args.model, len(names), names).to(args.device).train()
    loss_fn = v8DetectionLoss(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937)
    img = torch.rand(args.batch, 3, args.imgsz, args.imgsz, device=args.device)
    batch = {"batch_idx": torch.arange(args.batch).float().repeat_interleave(4).to(args.device),
             "cls": torch.zeros(args.batch * 4, 1, device=args.device),
             "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2], [0.5, 0.5, 0.1, 0.3], [0.2, 0.8, 0.2, 0.2]],
                                    device=args.device).repeat(args.batch, 1)}

    def step():
        loss, _ = loss_fn(model(img), batch)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp) / "synth", num_images=1000, imgsz=args.imgsz, seed=0, progress=False)
        records, names, _ = read_yolo_dataset(data)
        runs = {"ours": [], "ultralytics": [], "floor": []}
        for r in range(args.repeats):  # interleaved, so machine noise hits all three alike
            runs["ours"].append(ours(records, names, args))
            runs["ultralytics"].append(ultralytics_trainer(data / "data.yaml", args))
            runs["floor"].append(floor(names, args))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    table = Table(title=f"training throughput, {args.model} {args.imgsz}px batch {args.batch} on {args.device} (median of {args.repeats})")
    for col in ("runner", "images/s (median)", "runs", "vs ultralytics"):
        table.add_column(col)
    for k, v in med.items():
        table.add_row(k, f"{v:.1f}", ", ".join(f"{x:.1f}" for x in runs[k]), f"{v / med['ultralytics']:.2f}x")
    Console().print(table)
    result = {"command": " ".join([sys.executable, *sys.argv]), "args": vars(args), "runs": runs, "median": med,
              "ratio_ours_vs_ultralytics": med["ours"] / med["ultralytics"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
