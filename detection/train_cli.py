"""``fedsto train`` and ``fedsto eval``: centralised supervised training and per-domain evaluation."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

import torch
from rich.console import Console

from detection.atomic import atomic_write, atomic_write_text
from detection.manifest import FederationError
from detection.manifest_reader import Federation
from detection.metrics import evaluate_domains
from detection.model import ModelError, build_model, export_ultralytics, get_state, set_state
from detection.tables import domain_table, print_table
from detection.train import TrainConfig, train_labelled

console = Console()
errors = Console(stderr=True, soft_wrap=True)


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="centralised supervised training on a federation's labels")
    p.add_argument("federation", help="federation.json (or its folder)")
    p.add_argument("--labels", choices=["server", "all"], default="server",
                   help="server: the server's labelled images (partially supervised); all: every training label (upper bound)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--weights", default=None, help="optional .pt to start from")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=5, help="evaluate on the test splits every N epochs (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="output folder (default: runs/train-<labels>)")
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("eval", help="mAP50 / mAP50-95 of a model on every domain's test split")
    e.add_argument("model", help="an exported model.pt or a training checkpoint.pt")
    e.add_argument("federation")
    e.add_argument("--imgsz", type=int, default=None, help="default: the size the model was trained at")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.set_defaults(func=cmd_eval)


def load_detection_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """A DetectionModel from an exported Ultralytics ``.pt`` or a ``fedsto train`` checkpoint, with its metadata."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, ModuleNotFoundError, AttributeError) as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: expected a checkpoint dict, found {type(ckpt).__name__}")
    if "model_state" in ckpt:  # our training checkpoint
        cfg = ckpt["config"]
        model = build_model(cfg["model"], len(cfg["class_names"]), cfg["class_names"])
        set_state(model, ckpt["model_state"])
        return model, {"imgsz": cfg["imgsz"]}
    if "model" in ckpt and isinstance(ckpt["model"], torch.nn.Module):
        model = ckpt["model"].float()
        return model, dict(ckpt.get("fedsto", {}))
    raise ModelError(f"{path}: neither an Ultralytics checkpoint (key 'model') nor a fedsto checkpoint (key 'model_state')")


def cmd_train(args: argparse.Namespace) -> int:
    try:
        fed = Federation.load(args.federation)
    except (FederationError, FileNotFoundError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        return 2
    records = fed.server_records() if args.labels == "server" else fed.all_train_records()
    # Ultralytics sets OMP_NUM_THREADS=1 on import; a training command should use the machine.
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)  # the model's initial weights
    out = Path(args.out or f"runs/train-{args.labels}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": args.model, "class_names": list(fed.class_names), "imgsz": args.imgsz, "labels": args.labels,
              "batch": args.batch, "lr": args.lr, "seed": args.seed, "federation": str(fed.path)}
    model = build_model(args.model, len(fed.class_names), fed.class_names, weights=args.weights)
    ckpt_path, start_epoch, opt_state, elapsed = out / "checkpoint.pt", 0, None, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] != config:
            errors.print(f"[red]error:[/red] {ckpt_path} was made with other settings {ckpt['config']}; use another --out")
            return 2
        set_state(model, ckpt["model_state"])
        start_epoch, opt_state, elapsed = ckpt["epoch"], ckpt["optimizer_state"], ckpt["seconds"]
        console.print(f"resuming {ckpt_path} after epoch {start_epoch}")
    cfg = TrainConfig(imgsz=args.imgsz, batch_size=args.batch, lr=args.lr, seed=args.seed, device=args.device,
                      progress=True)
    tests = fed.test_records()
    console.print(f"training {args.model} on {len(records)} labelled images ({args.labels}), {args.epochs} epochs at {args.imgsz} px")
    log = (out / "metrics.jsonl").open("a")
    results = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        stats, opt_state = train_labelled(model, records, cfg.replace(
            warmup_steps=args.warmup_steps if epoch == 0 else 0, description=f"epoch {epoch + 1}/{args.epochs}"),
            optimizer_state=opt_state, seed_parts=(epoch,))
        elapsed += time.perf_counter() - t0
        checkpoint = {"model_state": get_state(model), "optimizer_state": opt_state, "epoch": epoch + 1,
                      "config": config, "seconds": elapsed}
        atomic_write(ckpt_path, lambda tmp: torch.save(checkpoint, tmp))
        row = {"epoch": epoch + 1, "seconds": round(elapsed, 1), **{f"loss_{k}": v for k, v in stats.losses.items()}}
        last = epoch + 1 == args.epochs
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            results = evaluate_domains(model, tests, args.imgsz, device=args.device)
            row["map50"] = {d: round(r["map50"], 4) for d, r in results.items()}
        log.write(json.dumps(row) + "\n")
        log.flush()
        console.print(f"epoch {epoch + 1}: {elapsed:.0f}s " + " ".join(f"{k} {v:.3f}" for k, v in stats.losses.items())
                      + (f"  mAP50 {row['map50']}" if "map50" in row else ""))
    if results is None:
        results = evaluate_domains(model, tests, args.imgsz, device=args.device)
    final = export_ultralytics(model, out / "model.pt", {"imgsz": args.imgsz, "labels": args.labels})
    atomic_write_text(out / "results.json", json.dumps({"train_seconds": elapsed, "results": results}, indent=2))
    print_table(console, domain_table({f"{args.labels} labels": results}))
    console.print(f"training time {elapsed:.0f}s; model {final}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        fed = Federation.load(args.federation)
        model, meta = load_detection_model(args.model)
    except (FederationError, ModelError, FileNotFoundError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        return 2
    imgsz = args.imgsz or int(meta.get("imgsz", 640))
    results = evaluate_domains(model, fed.test_records(), imgsz, device=args.device)
    print_table(console, domain_table({Path(args.model).name: results}))
    return 0
