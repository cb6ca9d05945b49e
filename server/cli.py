"""The ``fedsto`` command: data preparation, centralised training and evaluation, federated runs, strategies."""

from __future__ import annotations

import argparse
import sys

from detection.data_cli import add_data_commands
from detection.train_cli import add_train_commands
from server.launch import add_run_command
from server.report import add_report_command
from server.strategies_cli import add_strategies_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsto", description="Semi-supervised federated object detection (FedSTO)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
    add_train_commands(sub)
    add_run_command(sub)
    add_report_command(sub)
    add_strategies_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
