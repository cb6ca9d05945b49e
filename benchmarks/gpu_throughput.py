"""GPU clients: images/s and peak memory of 1, 2, 4, 8 concurrent clients on one GPU, and a sizing table.

Each client is a separate process (as a Ray actor with ``--gpus-per-client 1/k`` is) running the
clients' own supervised step (``detection.train.train_labelled``: letterbox cache, augmentation
on the prefetch thread, AMP) on the same synthetic images for ``--steps`` steps after
``--warmup``; the table gives the summed images/s of k clients against one client alone (k=1, one
process) and each client's peak ``torch.cuda.max_memory_allocated``. The sizing table is the peak
memory of one training step of yolo11n/s/m at ``--imgsz`` for batch 16 and 32 (AMP on): pick
``--gpus-per-client`` so that clients x peak fits the card with room to spare.

    python -m benchmarks.gpu_throughput                 # on a host with a CUDA GPU
    python -m benchmarks.gpu_throughput --imgsz 320 --steps 10

Without a CUDA device it prints one line and exits 0: nothing here is meaningful on a CPU.
Writes ``benchmarks/results/gpu_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def client(args: argparse.Namespace, records, names, start, out) -> None:
    """One client process: warm up, wait for the others, train ``args.steps`` steps; report images/s and memory."""
    from detection.model import build_model
    from detection.train import TrainConfig, train_labelled

    model = build_model(args.model, len(names), names)
    cfg = TrainConfig(imgsz=args.imgsz, batch_size=args.batch, device="cuda", amp=True)
    train_labelled(model, records, cfg.replace(max_steps=args.warmup))
    torch.cuda.reset_peak_memory_stats()
    start.wait()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats, _ = train_labelled(model, records, cfg.replace(max_steps=args.steps), seed_parts=(1,))
    torch.cuda.synchronize()
    out.put({"images_per_second": stats.images / (time.perf_counter() - t0),
             "peak_mib": torch.cuda.max_memory_allocated() / 2**20})


def concurrent(k: int, args, records, names) -> dict:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=client, args=(args, records, names, start, out)) for _ in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return {"clients": k, "images_per_second": sum(r["images_per_second"] for r in results),
            "peak_mib_per_client": max(r["peak_mib"] for r in results)}


def step_peak(model_yaml: str, imgsz: int, batch: int) -> float:
    """Peak MiB of one AMP training step (forward, loss, backward, SGD) of ``model_yaml`` at ``imgsz``."""
    from ultralytics.utils.loss import v8DetectionLoss

    from detection.model import build_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(model_yaml, 5, [str(i) for i in range(5)]).cuda().train()
    loss_fn, opt = v8DetectionLoss(model), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937)
    scaler = torch.amp.GradScaler("cuda")
    img = torch.rand(batch, 3, imgsz, imgsz, device="cuda")
    targets = {"batch_idx": torch.arange(batch, device="cuda").float().repeat_interleave(4),
               "cls": torch.zeros(batch * 4, 1, device="cuda"),
               "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2], [0.5, 0.5, 0.1, 0.3], [0.2, 0.8, 0.2, 0.2]],
                                      device="cuda").repeat(batch, 1)}
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.float16):
            loss, _ = loss_fn(model(img), targets)
        opt.zero_grad()
        scaler.scale(loss.sum()).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt, img
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_throughput.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device on this machine (torch.cuda.is_available() is False); nothing measured")
        return 0

    from rich.console import Console
    from rich.table import Table

    from detection.synthetic import write_synthetic_dataset
    from detection.yolo import read_yolo_dataset

    console = Console(highlight=False, width=160)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp) / "synth", num_images=(args.steps + args.warmup) * args.batch,
                                       imgsz=args.imgsz, seed=0, progress=False)
        records, names, _ = read_yolo_dataset(data)
        runs = {int(k): [concurrent(int(k), args, records, names) for _ in range(args.repeats)] for k in args.clients.split(",")}
    rows = {k: {"images_per_second": statistics.median(r["images_per_second"] for r in v),
                "peak_mib_per_client": max(r["peak_mib_per_client"] for r in v)} for k, v in runs.items()}
    base = rows[min(rows)]["images_per_second"]
    device = torch.cuda.get_device_name(0)
    table = Table(title=f"{args.model} clients on one {device}, {args.imgsz} px, batch {args.batch}, AMP "
                        f"(median of {args.repeats})")
    for col in ("clients", "images/s (sum)", "vs one process", "peak MiB per client"):
        table.add_column(col, justify="right")
    for k, r in rows.items():
        table.add_row(str(k), f"{r['images_per_second']:.0f}", f"{r['images_per_second'] / base:.2f}x",
                      f"{r['peak_mib_per_client']:.0f}")
    console.print(table)
    sizing = {f"{m} batch {b}": round(step_peak(f"{m}.yaml", args.imgsz, b)) for m in ("yolo11n", "yolo11s", "yolo11m")
              for b in (16, 32)}
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    sizing_table = Table(title=f"GPU sizing: peak memory of one training step at {args.imgsz} px (AMP) on {device}, "
                               f"{total:.0f} MiB")
    for col in ("model, batch", "peak MiB", "clients that fit", "--gpus-per-client"):
        sizing_table.add_column(col, justify="right")
    for key, peak in sizing.items():
        fit = max(1, int(total * 0.9 // (peak + 600)))  # 600 MiB: the CUDA context of each client process
        sizing_table.add_row(key, str(peak), str(fit), f"{1 / fit:.3g}")
    console.print(sizing_table)
    command = shlex.join(["python", "-m", "benchmarks.gpu_throughput", *(argv if argv is not None else sys.argv[1:])])
    console.print(f"measured by: {command}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, "device": device, "total_mib": total, "settings": vars(args),
                                          "runs": runs, "rows": rows, "sizing_peak_mib": sizing}, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
