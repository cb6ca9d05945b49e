"""Reports from run directories: ``results.md`` (the paper's Table 3 layout), PNG plots, comparisons.

``fedsto report RUN [RUN...]`` and the end of every run call these. They read only the run
directory (``config.json``, ``metrics.jsonl``, ``result.json``, ``teacher_check.json``), so a
report can be rebuilt anywhere, any time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detection.atomic import atomic_write_text
from detection.tables import domain_markdown, domain_table, print_table
from server import rundir as rd
from server.teacher_check import TEACHER_COLUMNS, teacher_row


@dataclass
class RunSummary:
    """What a report needs from one run directory."""

    path: Path
    method: str
    status: str
    server_domain: str
    final: dict           # {domain: {map50, map50_95}, "Total": ...} of the last evaluated step
    personal: dict        # same layout, personalised client models (last step that has them)
    rows: list[dict]
    result: dict
    config: dict

    @property
    def shifted_mean(self) -> float | None:
        """Unweighted mean mAP50 over the domains other than the server's (the clients' shifted domains)."""
        values = [m["map50"] for d, m in self.final.items() if d not in ("Total", self.server_domain)]
        return float(np.mean(values)) if values else None


def load_run(path: str | Path) -> RunSummary:
    """Read a run directory; raises FileNotFoundError naming what is missing."""
    path = Path(path).resolve()
    if not rd.holds_run(path):
        raise FileNotFoundError(f"{path}: not a run directory (no {rd.CONFIG})")
    run = rd.RunDir(path)
    config = run.config()
    rows = run.read_metrics()
    result = run.read_json(rd.RESULT) or {"status": "unfinished"}
    evals = [r for r in rows if "eval" in r]
    # Deployed: "personal" is each site's hold-out, not a domain test split (reported per site instead).
    personal = [r for r in rows if r.get("personal")] if not config.get("deployed") else []
    return RunSummary(path=path, method=config.get("run_config", {}).get("method", "?"), status=result.get("status", "?"),
                      server_domain=config.get("server_domain", ""), final=evals[-1]["eval"] if evals else {},
                      personal=personal[-1]["personal"] if personal else {}, rows=rows, result=result, config=config)


def row_names(runs: Sequence[RunSummary]) -> list[str]:
    """Row labels: the method, disambiguated by the run folder when two runs share a method."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.method] = counts.get(r.method, 0) + 1
    return [r.method if counts[r.method] == 1 else f"{r.method} ({r.path.name})" for r in runs]


def comparison_rows(runs: Sequence[RunSummary], personal: bool = False) -> dict[str, dict]:
    rows = {}
    for name, run in zip(row_names(runs), runs):
        if run.final:
            rows[name] = run.final
        if personal and run.personal:
            rows[f"{name} (personalised)"] = run.personal
    return rows


def shifted_line(runs: Sequence[RunSummary]) -> str:
    parts = [f"{name} {r.shifted_mean:.3f}" for name, r in zip(row_names(runs), runs) if r.shifted_mean is not None]
    return "mean mAP50 over the shifted (client) domains: " + ", ".join(parts) if parts else ""


def comparison_markdown(runs: Sequence[RunSummary]) -> str:
    """Methods by domains (mAP50 / mAP50-95), then the shifted-domain mean and run facts."""
    lines = ["## mAP per domain (server model)", "", domain_markdown(comparison_rows(runs)).rstrip(), ""]
    shifted = shifted_line(runs)
    if shifted:
        lines += [shifted, ""]
    if any(r.personal for r in runs):
        lines += ["## Personalised client models (each on its own domain)", "",
                  domain_markdown({f"{n} (personalised)": r.personal for n, r in zip(row_names(runs), runs) if r.personal}).rstrip(), ""]
    for name, r in zip(row_names(runs), runs):
        sites = r.result.get("sites") or {}
        if sites:  # deployment: a real server has no client test sets, each site reports its own hold-out
            lines += [f"## {name}: client sites on their own hold-outs (federated evaluation, last round)", "",
                      "| site | broadcast mAP50 / mAP50-95 | after local training |", "|---|---:|---:|"]
            lines += [f"| {site} | {m['broadcast_map50']:.3f} / {m['broadcast_map50_95']:.3f} | "
                      f"{m['personal_map50']:.3f} / {m['personal_map50_95']:.3f} |" for site, m in sites.items()]
            lines.append("")
    lines += ["## Runs", "", "| method | status | steps | failures | time (s) | MB up | MB down | run dir |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, r in zip(row_names(runs), runs):
        up = sum(row.get("bytes_up", 0) for row in r.rows) / 1e6
        down = sum(row.get("bytes_down", 0) for row in r.rows) / 1e6
        elapsed = r.rows[-1].get("elapsed", 0.0) if r.rows else 0.0
        lines.append(f"| {name} | {r.status} | {len(r.rows)} | {r.result.get('failures', 0)} | {elapsed:.0f} | "
                     f"{up:.1f} | {down:.1f} | {r.path} |")
    return "\n".join(lines) + "\n"


def run_markdown(run: RunSummary) -> str:
    """``results.md`` of one run."""
    cfg = run.config.get("run_config", {})
    keys = ("method", "strategy", "model", "imgsz", "warmup-epochs", "phase1-rounds", "phase2-rounds", "local-epochs",
            "batch-size", "lr", "ema-decay", "tau-low", "tau-high", "pseudo-mode", "ortho-lambda", "ortho-form",
            "fraction-train", "seed")
    lines = [f"# {run.method}: {run.path.name}", "", f"status: **{run.status}**; federation {run.config.get('federation')}; "
             f"sizes {json.dumps(run.config.get('federation_sizes', {}))}", "",
             "settings: " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg), ""]
    if run.status != "completed" and run.result.get("reason"):
        lines += [f"failure: {run.result['reason']}", ""]
    lines.append(comparison_markdown([run]))
    teacher = rd.RunDir(run.path).read_json(rd.TEACHER_CHECK)
    if teacher:
        s = teacher["summary"]
        lines += ["## Warm-up quality check (before round 1)", "",
                  f"server-domain mAP50 {s['server_domain_map50']:.3f}; server labels {s['server_boxes_per_image']:.2f} boxes/image"
                  + ("; **weak teacher warning**" if s.get("weak_teacher") else ""), "",
                  "| " + " | ".join(TEACHER_COLUMNS) + " |", "|---|---|---:|---:|---:|---:|"]
        for pid, m in sorted(s["clients"].items(), key=lambda kv: int(kv[0])):
            lines.append("| " + " | ".join(teacher_row(pid, m)) + " |")
        lines.append("")
    plots = sorted((run.path / "plots").glob("*.png")) if (run.path / "plots").exists() else []
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: RunSummary, out_dir: Path) -> list[Path]:
    """mAP per domain per step, losses, pseudo-label counts and precision, bytes per round."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run.rows
    warmup_end = max((r["step"] for r in rows if r.get("kind") == "warmup"), default=None)
    written = []

    def finish(fig, ax_list, name):
        for ax in ax_list:
            if warmup_end is not None:
                ax.axvline(warmup_end + 0.5, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    evals = [r for r in rows if "eval" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        domains = list(evals[-1]["eval"])
        for d in domains:
            xs = [r["step"] for r in evals if d in r["eval"]]
            ys = [r["eval"][d]["map50"] for r in evals if d in r["eval"]]
            ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if d == "Total" else 1.2, ls="--" if d == "Total" else "-", label=d)
        pers = [r for r in rows if r.get("personal")]
        if pers:
            ax.plot([r["step"] for r in pers], [r["personal"]["Total"]["map50"] for r in pers], "k^", ms=5,
                    label="personalised Total")
        ax.set_xlabel("step (warm-up epochs, then rounds)")
        ax.set_ylabel("mAP50")
        ax.set_title(f"{run.method}: mAP50 per domain")
        ax.legend(fontsize=8)
        finish(fig, [ax], "map_per_domain.png")

    server_rows = [r for r in rows if "server" in r]
    client_rows = [r for r in rows if r.get("client_losses")]
    if server_rows or client_rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted({k for r in server_rows for k in r["server"] if k.startswith("loss_")}):
            ax.plot([r["step"] for r in server_rows], [r["server"].get(key, np.nan) for r in server_rows], label=f"server {key[5:]}")
        for key in sorted({k for r in client_rows for k in r["client_losses"]}):
            ax.plot([r["step"] for r in client_rows], [r["client_losses"].get(key, np.nan) for r in client_rows], ls="--",
                    label=f"clients {key[5:]}")
        ax.set_xlabel("step")
        ax.set_ylabel("mean loss")
        ax.set_title(f"{run.method}: losses")
        ax.legend(fontsize=7, ncol=2)
        finish(fig, [ax], "losses.png")

    pseudo = [r for r in rows if "pseudo" in r]
    if pseudo:
        # Quality needs the hidden labels: simulation only, a deployed site has none.
        quality = [key for key in ("reliable_precision", "reliable_recall", "uncertain_precision", "uncertain_recall")
                   if any(key in r["pseudo"] for r in pseudo)]
        fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(10 if quality else 5.5, 4), squeeze=False)
        a1 = axes[0][0]
        xs = [r["step"] for r in pseudo]
        a1.plot(xs, [r["pseudo"]["reliable_per_image"] for r in pseudo], marker="o", ms=3, label="reliable")
        a1.plot(xs, [r["pseudo"]["uncertain_per_image"] for r in pseudo], marker="o", ms=3, label="uncertain")
        a1.set_title("pseudo boxes per image")
        a1.set_xlabel("step")
        a1.legend(fontsize=8)
        if quality:
            a2 = axes[0][1]
            for key in quality:
                a2.plot(xs, [r["pseudo"].get(key, np.nan) for r in pseudo], marker="o", ms=3, label=key.replace("_", " "))
            a2.set_title("pseudo-label quality (hidden labels, diagnostics)")
            a2.set_xlabel("step")
            a2.set_ylim(0, 1)
            a2.legend(fontsize=8)
        finish(fig, list(axes[0]), "pseudo_labels.png")

    comm = [r for r in rows if "bytes_up" in r]
    if comm:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        xs = [r["step"] for r in comm]
        ax.bar(np.array(xs) - 0.2, [r["bytes_down"] / 1e6 for r in comm], width=0.4, label="down")
        ax.bar(np.array(xs) + 0.2, [r["bytes_up"] / 1e6 for r in comm], width=0.4, label="up")
        ax.set_xlabel("step")
        ax.set_ylabel("MB per round")
        ax.set_title(f"{run.method}: communication")
        ax.legend(fontsize=8)
        finish(fig, [ax], "communication.png")
    return written


def plot_comparison(runs: Sequence[RunSummary], path: Path) -> Path:
    """Total and shifted-domain mAP50 per step of several runs on one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in zip(row_names(runs), runs):
        evals = [r for r in run.rows if "eval" in r]
        if not evals:
            continue
        ax.plot([r["step"] for r in evals], [r["eval"]["Total"]["map50"] for r in evals], marker="o", ms=3, label=f"{name} Total")
    ax.set_xlabel("step (warm-up epochs, then rounds)")
    ax.set_ylabel("mAP50")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_report(path: str | Path) -> Path:
    """Plots under ``<run>/plots`` and ``<run>/results.md``."""
    run = load_run(path)
    plot_run(run, run.path / "plots")
    out = run.path / "results.md"
    atomic_write_text(out, run_markdown(run))
    return out


def write_comparison(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> tuple[str, list[RunSummary], Path | None]:
    """Comparison markdown of several runs (written to ``out_dir/results.md`` with a plot when given)."""
    runs = [load_run(p) for p in paths]
    text = "# Comparison\n\n" + comparison_markdown(runs)
    written = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_comparison(runs, out_dir / "comparison_map50.png")
        text += "\n![Total mAP50 per step](comparison_map50.png)\n"
        written = out_dir / "results.md"
        atomic_write_text(written, text)
    return text, runs, written


def print_comparison(runs: Sequence[RunSummary], console) -> None:
    """The per-domain table (rich) and the shifted-domain line."""
    print_table(console, domain_table(comparison_rows(runs, personal=True), title="mAP50 / mAP50-95 per domain (server model)"))
    line = shifted_line(runs)
    if line:
        console.print(line)


def add_report_command(subparsers) -> None:
    p = subparsers.add_parser("report", help="comparison table and plots from run directories")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="write results.md and comparison_map50.png here (default: print only)")
    p.add_argument("--rebuild", action="store_true", help="also regenerate each run's own results.md and plots")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from rich.console import Console

    console = Console()
    try:
        if args.rebuild:
            for path in args.runs:
                write_run_report(path)
        text, runs, written = write_comparison(args.runs, args.out)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    print_comparison(runs, console)
    for name, run in zip(row_names(runs), runs):
        if run.status != "completed":
            console.print(f"[yellow]{name}: status {run.status}[/yellow] ({run.path})")
    if written:
        console.print(f"wrote {written}")
    return 0
