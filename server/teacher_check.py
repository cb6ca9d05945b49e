"""The warm-up quality check: is the warm-up model good enough to teach the clients?

Before round 1 every client runs the broadcast model as its round-1 teacher would and reports
pseudo boxes per image (``evaluate.teacher``). A weak teacher poisons the clients (DESIGN.md:
pseudo-labelled images then act as background), so this module turns the replies into a table,
a summary for ``teacher_check.json`` and loud warnings. Pure: the loop sends and prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.table import Table


@dataclass(frozen=True)
class TeacherThresholds:
    """When to warn (run-config ``weak-teacher-*``).

    Parameters
    ----------
    map50 : float
        Warm-up mAP50 on the server's domain below which the teacher is weak.
    density : float
        Fraction of the server's labelled boxes per image below which a client's reliable pseudo
        boxes per image are too few.
    precision : float
        Share of reliable pseudo boxes matching a true box below which a client's teacher is noisy.
    """

    map50: float
    density: float
    precision: float


TEACHER_COLUMNS = ("client", "domain", "reliable/img", "uncertain/img", "true/img (hidden)", "reliable precision")


def teacher_row(pid: str, m: Mapping) -> list[str]:
    """One client's cells under :data:`TEACHER_COLUMNS` ("-" where a deployed site, holding no labels, has none)."""
    def shown(key):
        return f"{m[key]:.2f}" if key in m else "-"

    return [pid, m["domain"], shown("reliable_per_image"), shown("uncertain_per_image"), shown("true_per_image"),
            shown("reliable_precision")]


def summarise_teacher_check(clients: Mapping[str, Mapping], server_domain: str, server_map50: float,
                            server_density: float, thresholds: TeacherThresholds,
                            failures: Sequence[str] = ()) -> tuple[dict, Table, list[str]]:
    """Summary, table and warnings of the check.

    Parameters
    ----------
    clients : mapping
        Partition id (str) -> the client's reply metrics plus its ``domain`` (deployed sites
        report no ``true_per_image`` or ``reliable_precision``: they hold no labels).
    server_domain : str
        The server's domain (its mAP50 is the teacher's quality on labelled data).
    server_map50 : float
        Warm-up model's mAP50 on the server domain's test split.
    server_density : float
        Labelled boxes per server image.
    thresholds : TeacherThresholds
    failures : sequence of str
        Failed replies of the check.

    Returns
    -------
    (dict, rich.table.Table, list of str)
        What ``teacher_check.json`` stores, the table to print, the warnings to print.
    """
    table = Table(title=f"warm-up quality check ({server_domain} mAP50 {server_map50:.3f}; "
                        f"server labels {server_density:.2f} boxes/image)")
    for col in TEACHER_COLUMNS:
        table.add_column(col, justify="right")
    ordered = sorted(clients.items(), key=lambda kv: int(kv[0]))
    for pid, m in ordered:
        table.add_row(*teacher_row(pid, m))
    weak = [pid for pid, m in ordered if m["reliable_per_image"] < thresholds.density * server_density]
    noisy = [pid for pid, m in ordered if m["reliable_per_image"] > 0 and "reliable_precision" in m
             and m["reliable_precision"] < thresholds.precision]
    summary = {"server_domain_map50": server_map50, "server_boxes_per_image": server_density, "clients": dict(clients),
               "failures": list(failures), "low_density_clients": weak, "noisy_clients": noisy,
               "weak_teacher": bool(server_map50 < thresholds.map50 or weak or noisy)}
    warnings = []
    if server_map50 < thresholds.map50:
        warnings.append(f"WEAK TEACHER: warm-up {server_domain} mAP50 {server_map50:.3f} < {thresholds.map50}; "
                        "pseudo labels will be poor and can make clients worse (lengthen the warm-up)")
    for pid in weak:
        m = clients[pid]
        warnings.append(f"WEAK TEACHER on client {pid} ({m['domain']}): {m['reliable_per_image']:.2f} reliable pseudo "
                        f"boxes per image vs {server_density:.2f} labelled boxes per server image; unlabelled images "
                        "will act mostly as background")
    for pid in noisy:
        m = clients[pid]
        warnings.append(f"NOISY TEACHER on client {pid} ({m['domain']}): only {m['reliable_precision']:.0%} of its "
                        f"{m['reliable_per_image']:.2f} reliable pseudo boxes per image match a true box (hidden "
                        "labels, diagnostics only); consider a longer warm-up or a higher tau-high")
    warnings += [f"teacher check: {f}" for f in failures]
    return summary, table, warnings
