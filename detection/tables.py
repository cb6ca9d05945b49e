"""Per-domain result tables (rich for the terminal, Markdown for results.md)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def domain_columns(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Domain names in first-seen order with ``Total`` last."""
    cols: list[str] = []
    for per_domain in rows.values():
        cols.extend(d for d in per_domain if d != "Total" and d not in cols)
    return cols + ["Total"]


def domain_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], title: str = "mAP50 / mAP50-95 per domain") -> Table:
    """A rich table: one row per method/model, one column per domain, cells ``mAP50 / mAP50-95``."""
    cols = domain_columns(rows)
    table = Table(title=title)
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for name, per_domain in rows.items():
        table.add_row(name, *[_cell(per_domain.get(c)) for c in cols])
    return table


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` whole: at its natural width when the output is not a terminal.

    A console writing to a file or pipe (a CI log, ``| tee``) is 80 columns wide, and rich would
    wrap every cell of a wider table onto two lines; a log has no width to respect.
    """
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(width=10_000, max_width=10_000), table).maximum
    Console(file=console.file, width=max(natural, console.width), highlight=False, color_system=None).print(table)


def domain_markdown(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The same table in Markdown (the paper's Table 3 layout: methods by domains, mAP50)."""
    cols = domain_columns(rows)
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, per_domain in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(per_domain.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n\ncells: mAP50 / mAP50-95; Total = unweighted mean over domains\n"


def _cell(metrics: Mapping[str, float] | None) -> str:
    if not metrics:
        return "-"
    return f"{metrics['map50']:.3f} / {metrics['map50_95']:.3f}"
