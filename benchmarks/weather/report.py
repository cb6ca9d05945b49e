"""RESULTS.md and the plots of the weather benchmark, from the recorded row results only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from benchmarks.weather.rows import NOT_BUILT, ROWS, SCALES

HERE = Path(__file__).resolve().parent
# The paper's Table (BDD100K, non-IID, mAP50 Total) for reference.
PAPER = {"partial": 0.511, "ssfl": 0.558, "fedsto": 0.593, "full": 0.605}
AGREEMENT = 0.02  # |ours - val()| per domain allowed where clear mAP50 >= 0.3
OLDER = " (older configuration)"


def gap_share(value: float, partial: float, full: float) -> float | None:
    """Share of the partial-to-full gap a method recovers (None when there is no gap)."""
    return (value - partial) / (full - partial) if full - partial > 1e-9 else None


def families(records: Mapping[str, dict]) -> dict[str, list[dict]]:
    """Recorded rows grouped by family (seeds of one row together), in ROWS order."""
    out: dict[str, list[dict]] = {}
    for row in ROWS:
        if row.name in records:
            out.setdefault(row.family, []).append(records[row.name])
    return out


def seed_pairs(fams: Mapping[str, list[dict]],
               methods: tuple[str, ...] = ("partial", "ssfl", "fedsto")) -> dict[int, dict[str, float]]:
    """Total mAP50 per seed and method, for the seeds where every one of ``methods`` is recorded.

    A seed trains its own warm-up, shared by its partial, ssfl and fedsto rows, so differences
    taken within a seed leave the warm-up's own luck out of the comparison.
    """
    by_seed: dict[int, dict[str, float]] = {}
    for method in methods:
        for rec in fams.get(method, []):
            by_seed.setdefault(int(rec["seed"]), {})[method] = rec["final"]["Total"]["map50"]
    return {seed: totals for seed, totals in sorted(by_seed.items()) if len(totals) == len(methods)}


def _seed_lines(fams: Mapping[str, list[dict]]) -> list[str]:
    pairs = seed_pairs(fams)
    if not pairs:
        return []
    lines = ["Per seed (each seed trains its own warm-up, shared by its three rows), Total mAP50 and the differences "
             "to partial within the seed:", ""]
    for seed, t in pairs.items():
        holds = t["partial"] < t["ssfl"] < t["fedsto"]
        lines.append(f"- seed {seed}: partial {t['partial']:.3f}, ssfl {t['ssfl']:.3f}, fedsto {t['fedsto']:.3f}; "
                     f"ssfl - partial {t['ssfl'] - t['partial']:+.3f}, fedsto - partial {t['fedsto'] - t['partial']:+.3f}; "
                     f"partial < ssfl < fedsto {'holds' if holds else 'does not hold'}")
    if len(pairs) >= 2:
        for method in ("ssfl", "fedsto"):
            diffs = [t[method] - t["partial"] for t in pairs.values()]
            wins = sum(d > 0 for d in diffs)
            lines.append(f"- {method} - partial over {len(diffs)} seeds: {np.mean(diffs):+.3f} ± "
                         f"{np.std(diffs, ddof=1):.3f} (above partial in {wins} of {len(diffs)})")
    return lines + [""]


def _sweep_lines(sweeps: Mapping[str, dict]) -> list[str]:
    """Teacher sweeps (``benchmarks.weather.teacher_sweep``): reliable boxes per image, precision / recall per tau_high."""
    lines = []
    # Warm-ups (the teachers the rows had) before other models (references).
    for name, sweep in sorted(sweeps.items(), key=lambda kv: (kv[1].get("kind") != "warm-up", kv[0])):
        sets = sweep["clients"]
        taus = [k for k in next(iter(sets.values())) if k != "images"]
        lines += [f"Teacher sweep `{name.removeprefix('teacher_sweep-')}`: {sweep.get('about') or sweep['model']}. "
                  f"Reliable pseudo boxes per image: precision / recall at each tau_high (NMS conf {sweep['nms_conf']}); `{sweep['command']}`", "",
                  "| images | true boxes/img | " + " | ".join(f"tau_high {t}" for t in taus) + " |",
                  "|---|---|" + "---|" * len(taus)]
        for label, rows in sets.items():
            cells = [f"{rows[t]['reliable_per_image']:.2f}: {rows[t]['precision']:.2f} / {rows[t]['recall']:.3f}" for t in taus]
            lines.append(f"| {label}, {rows['images']} | {rows[taus[0]]['true_per_image']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def _run_time(rec: Mapping) -> str:
    """Wall time of the row's pieces; with a reused warm-up, also the training time it stands on."""
    text = _minutes(rec["wall_seconds"])
    if (rec.get("warmup_cache") or {}).get("reused") and "elapsed_seconds" in rec:
        text += f" ({_minutes(rec['elapsed_seconds'])} of training steps with the reused warm-up's)"
    return text


def _comparison_lines(records: Mapping[str, dict], domains: list[str]) -> list[str]:
    """Rows comparable with each other: the results table, the paper's ordering, and the evidence."""
    fams = families(records)
    if not fams:
        return []
    totals = {f: [r["final"]["Total"]["map50"] for r in rs] for f, rs in fams.items()}
    return [*_results_lines(fams, totals, domains), "### The paper's ordering: partial < ssfl < fedsto <= full", "",
            *_ordering_lines(fams, totals), *_evidence_lines(fams)]


def _results_lines(fams: Mapping[str, list[dict]], totals: Mapping[str, list[float]], domains: list[str]) -> list[str]:
    """The results table (one line per family: seed means, gap share, val() column, run time)."""
    header = ["row", "seeds", *domains, "Total mAP50", "Total mAP50-95", "gap share", "val() mAP50 per domain (seed mean)",
              "run time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def same_seed_mean(ref: str, seeds: set[int]) -> float | None:
        """``ref``'s Total over the given seeds where it has them (a row on seed 1 is set against partial's seed 1)."""
        if ref not in fams:
            return None
        values = [r["final"]["Total"]["map50"] for r in fams[ref] if r["seed"] in seeds] or totals[ref]
        return float(np.mean(values))

    for fam, rs in fams.items():
        seeds = {r["seed"] for r in rs}
        partial, full = same_seed_mean("partial", seeds), same_seed_mean("full", seeds)
        share = gap_share(float(np.mean(totals[fam])), partial, full) if partial is not None and full is not None else None
        vals = [r.get("ultralytics_val_map50") or {} for r in rs]
        val = {d: float(np.mean([v[d] for v in vals])) for d in domains if all(d in v for v in vals)}  # seed mean
        cells = [fam, ",".join(str(r["seed"]) for r in rs),
                 *(_mean_spread([r["final"][d]["map50"] for r in rs]) for d in domains),
                 _mean_spread(totals[fam]), _mean_spread([r["final"]["Total"]["map50_95"] for r in rs]),
                 f"{round(share, 2) + 0.0:.0%}" if share is not None else "n/a",  # + 0.0: never "-0%"
                 " ".join(f"{val[d]:.3f}" for d in domains if d in val) or "n/a",
                 " + ".join(_run_time(r) for r in rs)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Gap share = (row - partial) / (full - partial), Total mAP50, means over the row's recorded seeds, "
                    "partial and full taken on the same seeds where they have them; "
                    "± is the sample standard deviation over seeds. The paper (BDD100K, YOLOv5-L, 640 px): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in PAPER.items())
                    + f"; FedSTO recovers {gap_share(PAPER['fedsto'], PAPER['partial'], PAPER['full']):.0%} of the gap.", ""]


def _ordering_lines(fams: Mapping[str, list[dict]], totals: Mapping[str, list[float]]) -> list[str]:
    """Whether partial < ssfl < fedsto <= full holds on the seed means, and the per-seed comparison."""
    if all(k in totals for k in PAPER):
        t = {k: float(np.mean(totals[k])) for k in PAPER}
        holds = t["partial"] < t["ssfl"] < t["fedsto"] <= t["full"]
        share = gap_share(t["fedsto"], t["partial"], t["full"])
        lines = [f"Total mAP50: partial {t['partial']:.3f}, ssfl {t['ssfl']:.3f}, fedsto {t['fedsto']:.3f}, "
                 f"full {t['full']:.3f}: the ordering **{'holds' if holds else 'does not hold'}**. "
                 + (f"FedSTO recovers {share:.0%} of the partial-to-full gap (paper: 87%)." if share is not None
                    else "There is no partial-to-full gap to share (full is not above partial).")]
    else:
        lines = ["Not all four rows (partial, full, ssfl, fedsto) are recorded yet."]
    return lines + ["", *_seed_lines(fams)]


def _evidence_lines(fams: Mapping[str, list[dict]]) -> list[str]:
    """Teacher quality before round 1, pseudo-label quality per round, and how much one evaluation moves."""
    lines = ["Teacher quality before round 1 (reliable pseudo boxes per image, precision, recall, from the hidden "
             "labels) and the reliable pseudo labels' precision and recall per round, for the rows with clients:", ""]
    for fam, rs in fams.items():
        for rec in rs:
            label = fam if rec is rs[0] else f"{fam} (seed {rec['seed']})"
            if rec.get("teacher_check"):
                clients = rec["teacher_check"].get("clients", {})
                lines.append(f"- **{label}** before round 1: " + "; ".join(
                    f"{c.get('domain')} {c.get('reliable_per_image', 0):.2f} boxes/img (precision "
                    f"{c.get('reliable_precision', float('nan')):.2f}, recall {c.get('reliable_recall', float('nan')):.2f})"
                    for c in clients.values()))
            if rec.get("pseudo"):
                lines.append("  - reliable pseudo labels by round, precision / recall (boxes per image): "
                             + ", ".join(f"{q['round']}: {q.get('reliable_precision', float('nan')):.2f} / "
                                         f"{q.get('reliable_recall', float('nan')):.2f} "
                                         f"({q.get('reliable_per_image', float('nan')):.2f})" for q in rec["pseudo"]))
    lines += ["", "How much one evaluation moves: Total mAP50 of the last three evaluated steps of each row (its first "
              "recorded seed; the result is the last of them), mean ± sample standard deviation:", ""]
    for fam, rs in fams.items():
        last = [p["total_map50"] for p in rs[0].get("curve", [])][-3:]
        if len(last) >= 2:
            lines.append(f"- {fam}: {' '.join(f'{v:.3f}' for v in last)} → {np.mean(last):.3f} ± {np.std(last, ddof=1):.3f}")
    return lines + [""]


def write_plots(records: Mapping[str, dict], domains: list[str], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    names = [r.name for r in ROWS if r.name in records and records[r.name].get("seed", 1) == 1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        curve = records[name]["curve"]
        warmup = [p for p in curve if p["kind"] == "warmup"][-1:]  # round 0: the end of the row's warm-up
        points = [(p["round"], p["total_map50"]) for p in warmup + [p for p in curve if p["kind"] == "round"]]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.set_xlabel("round (0: end of the warm-up)")
    ax.set_ylabel("Total mAP50")
    ax.set_title("Weather benchmark: Total mAP50 per evaluated round (seed 1)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="center right")
    fig.tight_layout()
    written.append(folder / "curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if names:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(names)
        x = np.arange(len(domains) + 1)
        for i, name in enumerate(names):
            final = records[name]["final"]
            ax.bar(x + i * width, [final[d]["map50"] for d in domains] + [final["Total"]["map50"]], width, label=name)
        ax.set_xticks(x + width * (len(names) - 1) / 2, domains + ["Total"])
        ax.set_ylabel("mAP50")
        ax.set_title("Weather benchmark: final mAP50 per domain (seed 1)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(folder / "domains.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(scale: str, records: Mapping[str, dict], manifest: Path, console=None, folder: Path = HERE,
                 stale: frozenset[str] = frozenset(), sweeps: Mapping[str, dict] | None = None,
                 recipe: int | None = None) -> Path:
    """Rewrite ``RESULTS.md`` (and its plots) in ``folder`` for ``scale`` from ``records``.

    ``stale`` names recorded rows whose configuration has changed since: they get a section of their own,
    are set only against each other (a gap share never mixes recipes), and are listed as to run again.
    Teacher sweeps measured with another training recipe than ``recipe`` go to that section too.
    """
    from detection.manifest_reader import Federation

    fed = Federation.load(manifest, check_files=False)
    domains = fed.domains
    sizes = fed.sizes()
    lines = [f"# Weather benchmark: FedSTO on real road images ({scale} scale)", "",
             "Written by `python -m benchmarks.weather` from the JSON files in "
             f"`benchmarks/weather/results/{scale}/`; nothing here is typed in by hand.", "",
             f"- **Data**: `../shared/data/highway` (real clear-weather road images, 5 classes). Server: "
             f"{sizes['server']} labelled {fed.server_domain} images; clients: {'/'.join(map(str, sizes['clients']))} "
             f"unlabelled images turned {', '.join(d for d in domains if d != fed.server_domain)} (see `montage.jpg`); "
             f"test: {', '.join(f'{d} {n}' for d, n in sizes['test'].items())} labelled images.",
             f"- **Scale**: {SCALES[scale].about}; preset `presets/{SCALES[scale].preset}.toml`.",
             "- **Metric**: mAP50 per domain on its labelled test split; Total = unweighted mean over domains "
             "(the paper's). `val()` = `YOLO(model.pt).val(data=<domain test split>, imgsz=<training imgsz>)`, "
             "other arguments at their defaults.", ""]

    current = {n: r for n, r in records.items() if n not in stale}
    older = {n: r for n, r in records.items() if n in stale}
    sweeps = sweeps or {}
    older_sweeps = {n: s for n, s in sweeps.items() if recipe is not None and s.get("recipe") != recipe}
    current_sweeps = {n: s for n, s in sweeps.items() if n not in older_sweeps}
    lines += ["## Results", "", *(_comparison_lines(current, domains)
                                  or ["No row is recorded with the current configuration yet (see Not yet run).", ""])]
    lines += _sweep_lines(current_sweeps)
    if older or older_sweeps:
        lines += ["## Recorded with an older configuration", "",
                  "These rows ran before a change of the preset, the federation or the training recipe (their recipe "
                  "is in the Runs table). They are set only against each other here, never against the rows above, "
                  "and each is listed under Not yet run to run again.", "",
                  *_comparison_lines(older, domains), *_sweep_lines(older_sweeps)]

    lines += ["## Agreement with Ultralytics' val()", ""]
    for name, rec in records.items():
        val = rec.get("ultralytics_val_map50") or {}
        clear = rec["final"].get(fed.server_domain, {}).get("map50", 0.0)
        diffs = {d: abs(rec["final"][d]["map50"] - val[d]) for d in domains if d in val}
        if not diffs:
            continue
        worst = max(diffs.values())
        verdict = ("within 0.02" if worst <= AGREEMENT else "NOT within 0.02") if clear >= 0.3 else "clear mAP50 < 0.3: not checked"
        lines.append(f"- {name}{OLDER if name in stale else ''}: largest per-domain difference {worst:.3f} ({verdict})")
    lines.append("")

    personal = {n: r["personal"] for n, r in records.items() if r.get("personal")}
    if personal:
        lines += ["## Personalised models (each client's own model on its own domain)", ""]
        for name, per in personal.items():
            lines.append(f"- {name}{OLDER if name in stale else ''}: "
                         + ", ".join(f"{d} {m['map50']:.3f}" for d, m in per.items()))
        lines.append("")

    missing = [r.name for r in ROWS if r.name not in records]
    lines += ["## Not yet run", ""]
    lines += [f"- {name}" for name in missing] or ["- (every row is recorded)"]
    lines += [f"- {name} again: recorded with an older configuration" for name in sorted(stale & set(records))]
    lines += [f"- {what}" for what in NOT_BUILT]
    lines += ["", "## Runs", "", "Recipe: the training code's behaviour the row ran with (`RECIPE_VERSION` in "
              "`detection/train.py`, whose comment says what each version changed); rows of different recipes "
              "are not comparable.", "",
              "| row | command | seed | recipe | finished | wall time | hardware | versions |", "|---|---|---|---|---|---|---|---|"]
    for name, rec in records.items():
        hw, v = rec["hardware"], rec["versions"]
        lines.append(f"| {name} | `{rec['command']}` | {rec['seed']} | {rec.get('recipe', 'n/a')} | {rec['finished']} | "
                     f"{_run_time(rec)} | {hw['cpu']}, {hw['cores']} cores | "
                     f"torch {v['torch']}, flwr {v['flwr']}, ultralytics {v['ultralytics']} |")
    # The plots show the current rows; only while there are none, the older ones (and say so).
    plots = write_plots(current or older, domains, folder) if records else []
    if plots:
        lines += ["", "Plots: " + ("the rows of the current configuration." if current
                                   else "the rows of the older configuration (none of the current one yet).")]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    out = folder / "RESULTS.md"
    out.write_text("\n".join(lines))
    if console is not None:
        console.print(f"wrote {out}" + (f" and {', '.join(p.name for p in plots)}" if plots else ""))
    return out
