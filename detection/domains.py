"""Domain rules: which domain each labelled image belongs to, before a federation is planned.

A rule is ``weather`` (every image is clear; :func:`detection.splits.plan_weather_federation`
assigns weather domains itself), ``folder`` (the reader's ``record.domain``), ``attribute:<key>``
(a per-image attribute such as BDD100K's ``weather``) or ``csv:<file>`` (a ``file,domain`` table).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from detection.manifest import FederationError
from detection.records import ImageRecord


def parse_domain_rule(rule: str) -> tuple[str, str]:
    """Split a domain rule into kind and argument.

    Parameters
    ----------
    rule : str
        ``"weather"``, ``"folder"``, ``"attribute:<key>"`` or ``"csv:<file>"``.

    Returns
    -------
    (kind, argument) : tuple of str

    Raises
    ------
    FederationError
        For an unknown rule or a missing argument.
    """
    kind, _, arg = str(rule).partition(":")
    if kind in ("weather", "folder") and not arg:
        return kind, ""
    if kind in ("attribute", "csv") and arg:
        return kind, arg
    raise FederationError(
        f"unknown domain rule {rule!r}; expected weather, folder, attribute:<key> (e.g. attribute:weather) "
        "or csv:<file>"
    )


def domains_from_attribute(records: Sequence[ImageRecord], key: str) -> list[str]:
    """Domain of each record from ``record.attributes[key]``.

    Raises
    ------
    FederationError
        If some records lack the attribute (count and examples in the message).
    """
    missing = [r.path for r in records if r.attributes.get(key) in (None, "")]
    if missing:
        raise FederationError(
            f"domain rule attribute:{key}: {len(missing)} of {len(records)} images have no '{key}' attribute, "
            f"e.g. {', '.join(missing[:3])}"
        )
    return [str(r.attributes[key]) for r in records]


def domains_from_csv(records: Sequence[ImageRecord], csv_file: str | Path) -> list[str]:
    """Domain of each record from a CSV with ``file,domain`` columns.

    A row's ``file`` matches a record by absolute path, by relative path (resolved against the
    CSV's folder, or as a trailing part of the record's path) or by file name.

    Parameters
    ----------
    records : sequence of ImageRecord
    csv_file : str or Path

    Returns
    -------
    list of str
        One domain per record.

    Raises
    ------
    FederationError
        On missing columns, conflicting rows, an ambiguous file name, or unmatched records (a few
        are listed).
    """
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"domain CSV {csv_file} does not exist")
    with csv_file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "domain"} <= {f.strip() for f in reader.fieldnames}:
            raise FederationError(
                f"{csv_file}: needs a header with columns 'file' and 'domain', got {reader.fieldnames}"
            )
        rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k}) for row in reader]
    by_path: dict[str, str] = {}
    by_suffix: dict[tuple[str, ...], str] = {}
    by_name: dict[str, str | None] = {}  # None: the name occurs with two domains, so it cannot decide
    for lineno, row in enumerate(rows, start=2):
        file, domain = row.get("file", ""), row.get("domain", "")
        if not file or not domain:
            raise FederationError(f"{csv_file}:{lineno}: empty 'file' or 'domain' in {row}")
        path = Path(file)
        full = path if path.is_absolute() else csv_file.parent / path
        key = os.path.normpath(os.path.abspath(full))
        if by_path.get(key, domain) != domain:
            raise FederationError(f"{csv_file}:{lineno}: {file} listed with two domains ({by_path[key]}, {domain})")
        by_path[key] = domain
        if not path.is_absolute():
            by_suffix[Path(os.path.normpath(file)).parts] = domain
        name = path.name
        by_name[name] = domain if by_name.get(name, domain) == domain else None
    suffix_lengths = sorted({len(k) for k in by_suffix}, reverse=True)

    domains, unmatched = [], []
    for record in records:
        path = os.path.normpath(os.path.abspath(record.path))
        domain = by_path.get(path)
        if domain is None:
            parts = Path(path).parts
            domain = next((by_suffix[parts[-n:]] for n in suffix_lengths if parts[-n:] in by_suffix), None)
        if domain is None and Path(path).name in by_name:
            domain = by_name[Path(path).name]
            if domain is None:
                raise FederationError(
                    f"{csv_file}: file name {Path(path).name} appears with different domains; "
                    "use full or relative paths"
                )
        if domain is None:
            unmatched.append(record.path)
        domains.append(domain)
    if unmatched:
        raise FederationError(
            f"{csv_file}: {len(unmatched)} of {len(records)} images have no row (matched by absolute path, "
            f"relative path or file name), e.g. {', '.join(unmatched[:3])}"
        )
    return domains


def record_domains(records: Sequence[ImageRecord], rule: str) -> list[str]:
    """Domain of each record under a non-``weather`` rule (see :func:`parse_domain_rule`)."""
    kind, arg = parse_domain_rule(rule)
    if kind == "attribute":
        return domains_from_attribute(records, arg)
    if kind == "csv":
        return domains_from_csv(records, arg)
    if kind == "folder":
        return [r.domain for r in records]
    raise FederationError(f"record_domains: rule {rule!r} assigns domains itself; use plan_weather_federation")
