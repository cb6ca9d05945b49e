"""Building a federation: plan it, write the weather-shifted images, write the manifest.

:func:`build_federation` turns labelled records and a domain rule (:mod:`detection.domains`) into
a plan (:mod:`detection.splits`) and writes ``federation.json`` (:mod:`detection.manifest`)
once, offline; :class:`detection.manifest_reader.Federation` loads it for training and evaluation.
Under the ``weather`` rule the shifted copies are written under ``images/<weather>/`` beside it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from detection.atomic import atomic_write_text
from detection.domains import parse_domain_rule, record_domains
from detection.manifest import (
    FORMAT,
    MANIFEST_KEYS,
    MANIFEST_NAME,
    FederationError,
    dump_manifest,
    manifest_file_path,
    validate_manifest,
)
from detection.records import ImageRecord, SkipReport
from detection.seeds import derive_seed
from detection.sites import write_site_manifests
from detection.splits import SERVER, TEST, UNUSED, FederationPlan, plan_federation, plan_weather_federation


def _label_rows(record: ImageRecord) -> list[list[float]]:
    return [[int(c), *(round(float(v), 6) for v in box)] for c, box in zip(record.classes, record.boxes)]


def _shifted_paths(plan: FederationPlan, records: Sequence[ImageRecord], out_dir: Path) -> dict[int, Path]:
    """Output file of every weather-shifted image (domain code > 0), unique per domain folder."""
    targets: dict[int, Path] = {}
    taken: set[Path] = set()
    for index in np.flatnonzero((plan.domain > 0) & (plan.role != UNUSED)).tolist():
        source = Path(records[index].path)
        target = out_dir / "images" / plan.domain_names[plan.domain[index]] / source.name
        if target in taken:  # same file name from two source folders
            target = target.with_name(f"{source.stem}__{index}{source.suffix}")
        taken.add(target)
        targets[index] = target
    return targets


def write_weather_images(
    jobs: Sequence[tuple[str, Path, str, int]], progress: bool = True, workers: int | None = None
) -> None:
    """Apply weather to each ``(source, target, weather, seed)`` once, in threads.

    Parameters
    ----------
    jobs : sequence of tuple
        ``(source image, target file, weather name, seed)``.
    progress : bool
        Show a rich progress bar.
    workers : int, optional
        Threads (default: CPU count).

    Raises
    ------
    FederationError
        If a transform fails (the source file and weather are named).
    """
    from detection.weather import apply_weather_to_file

    for folder in {target.parent for _, target, _, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)

    def run(job):
        source, target, weather, seed = job
        try:
            apply_weather_to_file(source, target, weather, seed)
        except Exception as err:  # noqa: BLE001 (re-raised with the file named)
            raise FederationError(f"applying weather {weather!r} to {source} -> {target} failed: {err}") from err

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = pool.map(run, jobs)
        if progress and jobs:
            from rich.progress import track

            results = track(results, total=len(jobs), description="weather images")
        for _ in results:
            pass


def build_federation(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    domain_rule: str,
    server_domain: str = "clear",
    server_fraction: float = 0.25,
    num_clients: int = 3,
    split: str = "non-iid",
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.15,
    seed: int = 0,
    weathers: Sequence[str] | None = None,
    progress: bool = True,
    report: SkipReport | None = None,
    site_holdout: int = 0,
) -> Path:
    """Build a federation from labelled records and write ``out_dir/federation.json``.

    Parameters
    ----------
    records : sequence of ImageRecord
        Labelled images (e.g. from :func:`detection.yolo.read_yolo_dataset`).
    class_names : sequence of str
    out_dir : str or Path
        Output folder (created); the manifest and, for the weather rule, the shifted images
        (``images/<weather>/<name>``) go here.
    domain_rule : str
        ``weather`` (every record is clear; disjoint subsets are shifted to ``weathers``),
        ``folder`` (``record.domain``), ``attribute:<key>`` or ``csv:<file>``.
    server_domain : str
        The server's (labelled) domain; for ``weather`` the name of the unshifted domain.
    server_fraction : float
        Server images as a fraction of all training images (test split excluded).
    num_clients : int
    split : {"non-iid", "iid", "dirichlet"}
    dirichlet_alpha : float
    test_fraction : float
        Fraction held out as the labelled per-domain test split.
    seed : int
        Fixes every random choice (numpy ``Generator``) and the per-image weather seeds.
    weathers : sequence of str, optional
        For ``weather``: the target domains (default all of ``detection.weather.WEATHERS``).
    progress : bool
        Progress bar while writing weather images.
    report : SkipReport, optional
        The reader's report, stored in the manifest.
    site_holdout : int
        Labelled hold-out images per client site (see :func:`detection.sites.site_manifests`).

    Returns
    -------
    Path
        The manifest file; the site manifests (``site-server.json``, ``site-client-<i>.json``)
        are written beside it first.

    Raises
    ------
    FederationError
        On an impossible configuration (see :func:`detection.splits.plan_federation`), or records that
        would make a manifest :func:`detection.manifest.validate_manifest` rejects (it is not written).
    """
    if not records:
        raise FederationError("no images to federate (the reader returned none; see its skip report)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.abspath(out_dir))
    rng = np.random.default_rng(seed)
    kind, _ = parse_domain_rule(domain_rule)
    if weathers is not None and kind != "weather":
        raise FederationError(f"weathers {list(weathers)} apply to the weather rule only, not {domain_rule!r}")
    common = dict(
        server_domain=server_domain,
        server_fraction=server_fraction,
        num_clients=num_clients,
        split=split,
        dirichlet_alpha=dirichlet_alpha,
        test_fraction=test_fraction,
        rng=rng,
    )

    files = [manifest_file_path(r.path, root) for r in records]
    if kind == "weather":
        weathers = _check_weathers(weathers)
        plan = plan_weather_federation(len(records), weathers=weathers, **common)
        targets = _shifted_paths(plan, records, root)
        jobs = [
            (records[i].path, target, plan.domain_names[plan.domain[i]], derive_seed(seed, i))
            for i, target in targets.items()
        ]
        write_weather_images(jobs, progress=progress)
        for i, target in targets.items():
            files[i] = manifest_file_path(target, root)
    else:
        plan = plan_federation(record_domains(records, domain_rule), **common)

    manifest = _manifest(plan, records, files, class_names, num_clients, report)
    manifest["seed"] = int(seed)
    manifest["split"] = split
    manifest["created_by"] = {
        "program": "detection.federation.build_federation",
        "domain_rule": domain_rule,
        "server_fraction": server_fraction,
        "num_clients": int(num_clients),
        "dirichlet_alpha": dirichlet_alpha,
        "test_fraction": test_fraction,
        "weathers": list(weathers) if kind == "weather" else None,
        "site_holdout": int(site_holdout),
    }
    manifest = {key: manifest[key] for key in MANIFEST_KEYS}
    path = root / MANIFEST_NAME
    validate_manifest(manifest, path)  # what is written must load; fail here, not at the first run
    text = dump_manifest(manifest)
    write_site_manifests(manifest, text, root, holdout=site_holdout)
    return atomic_write_text(path, text)


def _check_weathers(weathers: Sequence[str] | None) -> list[str]:
    from detection.weather import WEATHERS

    chosen = list(WEATHERS) if weathers is None else [str(w) for w in weathers]
    unknown = [w for w in chosen if w not in WEATHERS]
    if unknown:
        raise FederationError(f"unknown weather(s) {unknown}; choose from {', '.join(WEATHERS)}")
    if len(set(chosen)) != len(chosen):
        raise FederationError(f"weathers listed twice: {chosen}")
    return chosen


def _manifest(plan, records, files, class_names, num_clients, report) -> dict:
    names = plan.domain_names
    on_server = np.flatnonzero(plan.role == SERVER).tolist()
    server = [{"file": files[i], "labels": _label_rows(records[i])} for i in on_server]
    test = {name: [] for name in names}
    for i in np.flatnonzero(plan.role == TEST).tolist():
        test[names[plan.domain[i]]].append({"file": files[i], "labels": _label_rows(records[i])})
    members = np.flatnonzero(plan.client >= 0)
    members = members[np.argsort(plan.client[members], kind="stable")]
    bounds = np.searchsorted(plan.client[members], np.arange(num_clients + 1))
    clients = []
    for pid in range(num_clients):
        mine = members[bounds[pid] : bounds[pid + 1]].tolist()
        images = [
            {"file": files[i], "domain": names[plan.domain[i]], "hidden_labels": _label_rows(records[i])} for i in mine
        ]
        counts = Counter(image["domain"] for image in images)
        clients.append({"partition_id": pid, "domains": {d: counts[d] for d in names if counts[d]}, "images": images})
    return {
        "format": FORMAT,
        "class_names": list(class_names),
        "server_domain": names[0],
        "domains": list(names),
        "paths": "relative",
        "server": {"domain": names[0], "images": server},
        "clients": clients,
        "test": test,
        "unused": plan.unused,
        "report": report.as_dict() if report is not None else {},
    }
