"""``fedsto data ...``: make a synthetic dataset, build a federation manifest, inspect one.

The project's ``fedsto`` entry point calls :func:`add_data_commands` on its top-level
subparsers; ``python -m detection.data_cli synth OUT`` runs the same commands standalone.
Every command returns an exit code; bad input (:class:`~detection.datasets.DatasetError`,
:class:`~detection.manifest.FederationError`, a missing file) prints one red line and
returns 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from detection.datasets import DatasetError
from detection.manifest import SPLITS, FederationError
from detection.records import ImageRecord

EXIT_BAD_INPUT = 2


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        # Piped or captured output: rich would squeeze tables to 80 columns and cut the names.
        console = Console(stderr=stderr, soft_wrap=True, width=160)
    return console


def reports_bad_input(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected input errors of a command into one red line and exit code 2."""

    @functools.wraps(command)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (DatasetError, FederationError, FileNotFoundError) as err:
            from rich.markup import escape

            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}")
            return EXIT_BAD_INPUT

    return wrapped


# --------------------------------------------------------------------------------------------
# synth


@reports_bad_input
def cmd_synth(args: argparse.Namespace) -> int:
    """Write the built-in synthetic scenes as a YOLO dataset (``fedsto data synth OUT``)."""
    from detection.synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(args.out, num_images=args.num_images, imgsz=args.imgsz, seed=args.seed)
    _console().print(f"wrote {args.num_images} synthetic images ({args.imgsz} px) to {out} (data.yaml inside)")
    return 0


# --------------------------------------------------------------------------------------------
# federate


def _comma_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def read_source(
    source: str | Path,
    fmt: str | None,
    domain_rule: str,
    *,
    bdd_images: str | None = None,
    classes: Sequence[str] | None = None,
    strict: bool | None = None,
):
    """Read a dataset for federating, with the reader and options the domain rule needs.

    Parameters
    ----------
    source : str or Path
        YOLO dataset (folder or yaml) or BDD100K labels (JSON, folder of JSONs, or a folder with
        ``labels/`` and ``images/``).
    fmt : {"yolo", "bdd100k", None}
        ``None`` auto-detects (:func:`detection.datasets.detect_format`).
    domain_rule : str
        The federation's domain rule; ``folder`` makes the YOLO reader take domains from
        ``images/<domain>/``.
    bdd_images : str, optional
        BDD100K image folder.
    classes : sequence of str, optional
        BDD100K class list (mapped with :func:`detection.bdd100k.category_map_for`).
    strict : bool, optional
        Reader's ``strict``; ``None`` keeps the reader's default.

    Returns
    -------
    (records, class_names, report)
    """
    from detection.bdd100k import bdd_layout, read_bdd100k
    from detection.datasets import detect_format
    from detection.yolo import read_yolo_dataset

    fmt = fmt or detect_format(source)
    strictness = {} if strict is None else {"strict": strict}
    if fmt == "yolo":
        if classes is not None:
            raise DatasetError("--classes applies to BDD100K only; a YOLO dataset's classes come from its data.yaml")
        domain_from = "folder" if domain_rule == "folder" else None
        return read_yolo_dataset(source, domain_from=domain_from, **strictness)
    labels, images = bdd_layout(source, bdd_images)
    return read_bdd100k(labels, images, classes=classes, **strictness)


@reports_bad_input
def cmd_federate(args: argparse.Namespace) -> int:
    """Read a dataset and write its federation manifest (``fedsto data federate SRC OUT``)."""
    from detection.datasets import detect_format
    from detection.federation import build_federation

    fmt = args.format or detect_format(args.src)
    rule = args.domain_rule or ("weather" if fmt == "yolo" else "attribute:weather")
    console = _console()
    console.print(f"reading {fmt} dataset {args.src} ...")
    records, class_names, report = read_source(
        args.src, fmt, rule, bdd_images=args.bdd_images, classes=args.classes, strict=args.strict
    )
    console.print(f"{len(records)} images, classes {class_names}; skipped/repaired: {report}")
    path = build_federation(
        records,
        class_names,
        args.out,
        domain_rule=rule,
        server_domain=args.server_domain,
        server_fraction=args.server_fraction,
        num_clients=args.clients,
        split=args.split,
        dirichlet_alpha=args.alpha,
        test_fraction=args.test_fraction,
        seed=args.seed,
        weathers=args.weathers,
        progress=True,
        report=report,
        site_holdout=args.site_holdout,
    )
    from detection.manifest_reader import Federation

    federation = Federation.load(path)
    console.print(f"wrote {path}: {_one_line_summary(federation)}")
    console.print(f"site manifests beside it: site-server.json, site-client-0..{federation.num_clients - 1}.json "
                  f"(fedsto data export-site {path.parent} SITE OUT copies one site's files)")
    return 0


@reports_bad_input
def cmd_export_site(args: argparse.Namespace) -> int:
    """Copy one site's files into a folder of its own (``fedsto data export-site FEDERATION SITE OUT``)."""
    from detection.sites import describe_site, export_site

    path = export_site(args.federation, args.site, args.out, progress=True)
    _console().print(f"wrote {path}: {describe_site(path)}")
    return 0


def _one_line_summary(federation) -> str:
    sizes = federation.sizes()
    clients = sizes["clients"]
    unused = {d: u["count"] for d, u in federation.unused.items()}
    return (
        f"server {sizes['server']} labelled ({federation.server_domain}), {len(clients)} clients "
        f"({min(clients)}-{max(clients)} images each), test {sizes['test']}" + (f", unused {unused}" if unused else "")
    )


# --------------------------------------------------------------------------------------------
# inspect


def count_boxes(records: Sequence[ImageRecord], num_classes: int) -> np.ndarray:
    """Boxes per class over ``records`` (``(num_classes,)`` int)."""
    if not records:
        return np.zeros(num_classes, np.int64)
    classes = np.concatenate([r.classes for r in records])
    return np.bincount(classes[(classes >= 0) & (classes < num_classes)], minlength=num_classes)


def federation_nodes(federation, max_clients: int | None = None) -> list[tuple[str, str, list[ImageRecord]]]:
    """``(node, domains, records)`` rows for the inspect table: server, clients, test splits.

    Client records carry hidden labels (diagnostics only). ``max_clients`` limits the clients
    listed; the rest are folded into one ``other clients`` row.
    """
    rows = [("server", federation.server_domain, federation.server_records())]
    shown = federation.num_clients if max_clients is None else min(max_clients, federation.num_clients)
    for pid in range(shown):
        counts = federation.client_domain_counts(pid)
        domains = ", ".join(f"{d} {n}" for d, n in counts.items()) if len(counts) > 1 else next(iter(counts), "-")
        rows.append((f"client {pid}", domains, federation.client_hidden_records(pid)))
    if shown < federation.num_clients:
        rest = [r for pid in range(shown, federation.num_clients) for r in federation.client_hidden_records(pid)]
        rows.append((f"clients {shown}..{federation.num_clients - 1}", "mixed", rest))
    for domain, records in federation.test_records().items():
        rows.append((f"test:{domain}", domain, records))
    return rows


def dataset_nodes(records: Sequence[ImageRecord]) -> list[tuple[str, str, list[ImageRecord]]]:
    """Rows for inspecting a plain dataset: grouped by split (YOLO) or weather (BDD100K)."""
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        key = record.attributes.get("split") or record.attributes.get("weather") or "all"
        groups.setdefault(str(key), []).append(record)
    return [(key, ", ".join(sorted({r.domain for r in group})), group) for key, group in groups.items()]


def node_table(nodes, class_names: Sequence[str], title: str, caption: str | None = None):
    """A rich table: per node its domain(s), images, background images, boxes per class."""
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for column in ("node", "domain(s)", "images", "no box", "boxes"):
        table.add_column(column, justify="left" if column in ("node", "domain(s)") else "right")
    for name in class_names:
        table.add_column(name, justify="right")
    for node, domains, records in nodes:
        per_class = count_boxes(records, len(class_names))
        background = sum(1 for r in records if len(r.classes) == 0)
        totals = [len(records), background, int(per_class.sum()), *per_class.tolist()]
        table.add_row(node, domains, *map(str, totals))
    return table


def skip_table(report: dict, title: str):
    """A rich table of a stored skip report (``{reason: {"count", "examples"}}``)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("example")
    for reason, entry in report.items():
        table.add_row(reason, str(entry["count"]), (entry.get("examples") or [""])[0])
    return table


def montage_records(federation, per_domain: int) -> dict[str, list[ImageRecord]]:
    """A few labelled images per domain: test split first, then server, then clients' hidden labels."""
    # Whole test lists are passed on: the montage shows the first few and labels the row with the count.
    picked: dict[str, list[ImageRecord]] = federation.test_records()
    sources = [federation.server_records()] + [
        federation.client_hidden_records(pid) for pid in range(federation.num_clients)
    ]
    for records in sources:
        if all(len(v) >= per_domain for v in picked.values()):
            break
        for record in records:
            chosen = picked.setdefault(record.domain, [])
            if len(chosen) < per_domain:
                chosen.append(record)
    return {d: picked[d] for d in federation.domains if picked.get(d)}


@reports_bad_input
def cmd_inspect(args: argparse.Namespace) -> int:
    """Show who holds what in a federation (or a dataset), optionally write a montage PNG."""
    from detection.manifest import MANIFEST_NAME
    from detection.manifest_reader import Federation

    target = Path(args.target)
    console = _console()
    is_manifest = target.is_file() and target.suffix == ".json" and _looks_like_manifest(target)
    if is_manifest or (target.is_dir() and (target / MANIFEST_NAME).is_file()):
        federation = Federation.load(target)
        caption = "client boxes are hidden labels (diagnostics only; training never sees them)"
        nodes = federation_nodes(federation, args.max_clients)
        console.print(node_table(nodes, federation.class_names, f"federation {federation.path}", caption))
        console.print(f"split {federation.split}, seed {federation.seed}, created by {federation.created_by}")
        if federation.unused:
            console.print(f"unused images: {federation.unused}")
        report = federation.report
        class_names = federation.class_names
        by_domain = montage_records(federation, args.per_domain) if args.montage else {}
    else:
        records, class_names, skips = read_source(target, args.format, "", bdd_images=args.bdd_images)
        console.print(node_table(dataset_nodes(records), class_names, f"dataset {target}"))
        report = skips.as_dict()
        by_domain = {}
        for record in records:
            group = by_domain.setdefault(str(record.attributes.get("split") or record.domain), [])
            if len(group) < args.per_domain:
                group.append(record)
    if report:
        console.print(skip_table(report, "skipped / repaired while reading"))
    else:
        console.print("reader skipped nothing")
    if args.montage:
        from detection.montage import write_montage

        out = write_montage(by_domain, class_names, args.montage, per_domain=args.per_domain)
        console.print(f"montage: {out}")
    return 0


def _looks_like_manifest(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"fedsto-federation/" in handle.read(4096)


# --------------------------------------------------------------------------------------------
# Registration


def register_data_subcommands(subparsers) -> None:
    """Add ``synth``, ``federate`` and ``inspect`` to an argparse subparsers object."""
    synth = subparsers.add_parser("synth", help="write the built-in synthetic road scenes as a YOLO dataset")
    synth.add_argument("out", metavar="OUT", help="output folder")
    synth.add_argument("--num-images", type=int, default=1000)
    synth.add_argument("--imgsz", type=int, default=160)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)

    fed = subparsers.add_parser("federate", help="split a dataset into server / clients / test: federation.json")
    fed.add_argument("src", metavar="SRC", help="YOLO dataset (folder or data.yaml) or BDD100K labels")
    fed.add_argument("out", metavar="OUT", help="output folder (federation.json, weather images)")
    fed.add_argument("--format", choices=("yolo", "bdd100k"), default=None, help="default: auto-detect")
    fed.add_argument(
        "--domain-rule",
        default=None,
        help="weather | folder | attribute:KEY | csv:FILE (default: weather for YOLO, attribute:weather for BDD100K)",
    )
    fed.add_argument("--weathers", type=_comma_list, default=None, help="for the weather rule, e.g. rainy,snowy")
    fed.add_argument("--server-domain", default="clear")
    fed.add_argument("--server-fraction", type=float, default=0.25)
    fed.add_argument("--clients", type=int, default=3)
    fed.add_argument("--split", choices=SPLITS, default="non-iid")
    fed.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--split dirichlet)")
    fed.add_argument("--test-fraction", type=float, default=0.15)
    fed.add_argument("--seed", type=int, default=0)
    fed.add_argument("--bdd-images", default=None, help="BDD100K image folder (default: images/ beside labels/)")
    fed.add_argument("--classes", type=_comma_list, default=None, help="BDD100K classes, e.g. car,bus,truck,person")
    fed.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="raise on bad class ids / categories / boxes instead of dropping them (default: the reader's)",
    )
    fed.add_argument("--site-holdout", type=int, default=0, metavar="N",
                     help="labelled hold-out images per client site (its own federated evaluation); default 0")
    fed.set_defaults(func=cmd_federate)

    export = subparsers.add_parser("export-site", help="copy one site's manifest and files into a folder of its own")
    export.add_argument("federation", metavar="FEDERATION", help="federation.json or its folder")
    export.add_argument("site", metavar="SITE", help="server or client-<i>")
    export.add_argument("out", metavar="OUT", help="new or empty folder (gets site.json and the site's images)")
    export.set_defaults(func=cmd_export_site)

    inspect = subparsers.add_parser("inspect", help="table of who holds what; optional montage PNG")
    inspect.add_argument("target", metavar="FEDERATION_OR_DIR", help="federation.json, its folder, or a dataset")
    inspect.add_argument("--montage", default=None, metavar="FILE.png", help="write a few images per domain")
    inspect.add_argument("--per-domain", type=int, default=4, help="montage images per domain")
    inspect.add_argument("--max-clients", type=int, default=20, help="clients listed one per row")
    inspect.add_argument("--format", choices=("yolo", "bdd100k"), default=None, help="for a dataset target")
    inspect.add_argument("--bdd-images", default=None, help="for a BDD100K dataset target")
    inspect.set_defaults(func=cmd_inspect)


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register the ``data`` command group (``synth``, ``federate``, ``export-site``, ``inspect``).

    Parameters
    ----------
    subparsers
        The top-level ``fedsto`` subparsers (from ``parser.add_subparsers()``).

    Returns
    -------
    argparse.ArgumentParser
        The ``data`` parser; each leaf sets ``func`` to a ``cmd_*(args) -> int``.
    """
    data = subparsers.add_parser("data", help="datasets and federation manifests")
    register_data_subcommands(data.add_subparsers(dest="data_command", required=True, metavar="COMMAND"))
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m detection.data_cli {synth,federate,export-site,inspect} ...``."""
    parser = argparse.ArgumentParser(prog="python -m detection.data_cli", description=__doc__.split("\n")[0])
    register_data_subcommands(parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
