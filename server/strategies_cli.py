"""``fedsto strategies``: every aggregation strategy found, built-in and installed plug-ins, with its options."""

from __future__ import annotations


def add_strategies_command(subparsers) -> None:
    p = subparsers.add_parser("strategies", help="list the aggregation strategies (built-in and plug-ins) and their options",
                              description="Every strategy `strategy = NAME` can select, with `strategy-options` it accepts.")
    p.set_defaults(func=cmd_strategies)


def option_lines(cls) -> str:
    """One line per option: ``name=default (type): doc``."""
    return "\n".join(f"{o.name}={o.default} ({o.type.__name__}): {o.doc}" for o in cls.options) or "-"


def cmd_strategies(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from strategies import ENTRY_POINT_GROUP, available

    console = Console()
    table = Table(title="Aggregation strategies: strategy = NAME, strategy-options = \"name=value ...\"", show_lines=True)
    for column in ("name", "source", "description", "options"):
        table.add_column(column, overflow="fold")
    broken = 0
    for name, source, cls, error in available():
        if cls is None:
            broken += 1
            table.add_row(name, source, f"[red]cannot be loaded:[/red] {error}", "")
        else:
            summary = cls.description or next(iter((cls.__doc__ or "").strip().splitlines()), "")
            table.add_row(name, source, summary, option_lines(cls))
    console.print(table)
    console.print(f"Plug-ins: entry points in the group '{ENTRY_POINT_GROUP}' of installed packages (see docs/strategies.md); "
                  "any 'package.module:Class' works too.")
    return 1 if broken else 0
