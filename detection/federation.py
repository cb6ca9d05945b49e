"""The federation manifest: which images the server holds with labels, which each client holds
without labels, and the labelled test split per domain.

The manifest is a plain JSON file (``federation.json``) and the single source of truth for "who
holds what". :func:`build_federation` writes it once, offline; :class:`Federation` loads and
validates it for training and evaluation. Planning is pure index arithmetic on numpy arrays
(:func:`plan_federation`, :func:`plan_weather_federation`), so 1,000+ clients cost nothing.

Layout (``paths`` is always ``"relative"``: an image inside the manifest's folder is stored
relative to that folder, any other one absolutely; never relative to the working directory)::

    {"format": "fedsto-federation/1", "created_by": {...parameters...}, "seed": 0,
     "class_names": [...], "server_domain": "clear", "domains": ["clear", "rainy", ...],
     "split": "non-iid", "paths": "relative",
     "server": {"domain": "clear", "images": [{"file": ..., "labels": [[c, x, y, w, h], ...]}]},
     "clients": [{"partition_id": 0, "domains": {"rainy": 312},
                  "images": [{"file": ..., "domain": "rainy", "hidden_labels": [...]}]}],
     "test": {"clear": [{"file": ..., "labels": [...]}], ...},
     "unused": {"<domain>": {"count": n, "reason": "..."}},
     "report": {"<skip reason>": {"count": n, "examples": [...]}}}

Clients' true labels are kept as ``hidden_labels`` for evaluation and diagnostics only; the
training path reads client images through :meth:`Federation.client_images`, which returns paths.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detection.records import ImageRecord, SkipReport
from detection.seeds import derive_seed

FORMAT = "fedsto-federation/1"
MANIFEST_NAME = "federation.json"
SPLITS = ("non-iid", "iid", "dirichlet")
MANIFEST_KEYS = (
    "format", "created_by", "seed", "class_names", "server_domain", "domains", "split", "paths",
    "server", "clients", "test", "unused", "report",
)  # fmt: skip

# Roles of an image in a plan.
UNUSED, SERVER, CLIENT, TEST = 0, 1, 2, 3


class FederationError(ValueError):
    """A federation that cannot be built or loaded as asked; the message names the file/key."""


# --------------------------------------------------------------------------------------------
# Domain rules


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


# --------------------------------------------------------------------------------------------
# Planning (pure)


@dataclass
class FederationPlan:
    """Who holds what, as index arrays over the input records.

    Attributes
    ----------
    domain_names : list of str
        Manifest domain order (server domain first).
    domain : np.ndarray
        ``(N,)`` domain code of each record (index into ``domain_names``).
    role : np.ndarray
        ``(N,)`` one of ``UNUSED``, ``SERVER``, ``CLIENT``, ``TEST``.
    client : np.ndarray
        ``(N,)`` partition id of client images, -1 elsewhere.
    unused : dict
        ``{domain: {"count": n, "reason": str}}``.
    """

    domain_names: list[str]
    domain: np.ndarray
    role: np.ndarray
    client: np.ndarray
    unused: dict = field(default_factory=dict)


def even_sizes(total: int, parts: int) -> np.ndarray:
    """Sizes of ``parts`` nearly equal groups summing to ``total`` (the first ones get the extra)."""
    base, extra = divmod(int(total), int(parts))
    return base + (np.arange(parts) < extra).astype(np.int64)


def largest_remainder_counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``proportions * total``."""
    exact = proportions * total
    counts = np.floor(exact).astype(np.int64)
    short = int(total - counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _check_fractions(server_fraction: float, test_fraction: float, num_clients: int, split: str, alpha: float) -> None:
    if not 0 < server_fraction < 1:
        raise FederationError(f"server_fraction must be in (0, 1), got {server_fraction}")
    if not 0 <= test_fraction < 1:
        raise FederationError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if int(num_clients) < 1:
        raise FederationError(f"num_clients must be >= 1, got {num_clients}")
    if split not in SPLITS:
        raise FederationError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "dirichlet" and not alpha > 0:
        raise FederationError(f"dirichlet_alpha must be > 0, got {alpha}")


def _server_count(n_train: int, server_fraction: float) -> int:
    n_server = int(round(server_fraction * n_train))
    if n_server < 1:
        raise FederationError(
            f"server_fraction {server_fraction} of {n_train} training images leaves the server no image"
        )
    return n_server


def plan_federation(
    domains: Sequence[str],
    *,
    server_domain: str,
    server_fraction: float = 0.25,
    num_clients: int = 3,
    split: str = "non-iid",
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.15,
    rng: np.random.Generator,
) -> FederationPlan:
    """Plan a federation for records whose domains are known.

    The test split takes ``round(test_fraction * n)`` images of every domain. The server gets
    ``round(server_fraction * training images)`` images of ``server_domain``; the other training
    images form the client pool, partitioned by ``split`` (see :func:`partition_clients`).

    Parameters
    ----------
    domains : sequence of str
        Domain of each record.
    server_domain : str
    server_fraction, test_fraction : float
    num_clients : int
    split : {"non-iid", "iid", "dirichlet"}
    dirichlet_alpha : float
    rng : np.random.Generator

    Returns
    -------
    FederationPlan

    Raises
    ------
    FederationError
        If the server domain is absent or too small, or clients would get no image.
    """
    _check_fractions(server_fraction, test_fraction, num_clients, split, dirichlet_alpha)
    present = Counter(domains)
    if server_domain not in present:
        raise FederationError(f"server domain {server_domain!r} not among the domains {dict(sorted(present.items()))}")
    names = [server_domain] + sorted(d for d in present if d != server_domain)
    lookup = {name: code for code, name in enumerate(names)}
    domain = np.fromiter((lookup[d] for d in domains), np.int64, count=len(domains))
    role = np.full(len(domain), UNUSED, np.int64)

    for code in range(len(names)):
        members = rng.permutation(np.flatnonzero(domain == code))
        role[members[: int(round(test_fraction * len(members)))]] = TEST

    train = np.flatnonzero(role != TEST)
    n_server = _server_count(len(train), server_fraction)
    candidates = train[domain[train] == 0]
    if len(candidates) < n_server:
        counts = {names[c]: int(n) for c, n in zip(*np.unique(domain[train], return_counts=True))}
        raise FederationError(
            f"server domain {server_domain!r} has only {len(candidates)} training images, but server_fraction "
            f"{server_fraction} of {len(train)} training images needs {n_server}; lower the server fraction or pick "
            f"another server domain (training images per domain: {counts})"
        )
    role[rng.permutation(candidates)[:n_server]] = SERVER

    pool = np.flatnonzero(role == UNUSED)
    client, unused = partition_clients(pool, domain, names, num_clients, split, dirichlet_alpha, rng)
    role[client >= 0] = CLIENT
    return FederationPlan(names, domain, role, client, unused)


def plan_weather_federation(
    num_images: int,
    *,
    weathers: Sequence[str],
    server_domain: str = "clear",
    server_fraction: float = 0.25,
    num_clients: int = 3,
    split: str = "non-iid",
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.15,
    rng: np.random.Generator,
) -> FederationPlan:
    """Plan a federation that turns clear images into disjoint weather domains.

    ``round(test_fraction * num_images)`` test images are divided evenly across all domains
    (the clear server domain included); of the training images ``round(server_fraction * n)``
    stay clear for the server and the rest are divided evenly across ``weathers``. Clients
    then partition the weather images by ``split``.

    Parameters
    ----------
    num_images : int
        Number of (clear) source images.
    weathers : sequence of str
        Target weather domains.
    server_domain : str
        Name of the unshifted domain.
    server_fraction, test_fraction, num_clients, split, dirichlet_alpha, rng
        As in :func:`plan_federation`.

    Returns
    -------
    FederationPlan
    """
    _check_fractions(server_fraction, test_fraction, num_clients, split, dirichlet_alpha)
    if not weathers:
        raise FederationError("the weather rule needs at least one weather")
    if server_domain in weathers:
        raise FederationError(f"server domain {server_domain!r} cannot also be a weather")
    names = [server_domain, *weathers]
    domain = np.zeros(num_images, np.int64)
    role = np.full(num_images, UNUSED, np.int64)
    order = rng.permutation(num_images)

    n_test = int(round(test_fraction * num_images))
    test = order[:n_test]
    role[test] = TEST
    domain[test] = np.repeat(np.arange(len(names)), even_sizes(n_test, len(names)))

    train = order[n_test:]
    n_server = _server_count(len(train), server_fraction)
    role[train[:n_server]] = SERVER
    shifted = train[n_server:]
    domain[shifted] = 1 + np.repeat(np.arange(len(weathers)), even_sizes(len(shifted), len(weathers)))

    client, unused = partition_clients(shifted, domain, names, num_clients, split, dirichlet_alpha, rng)
    role[client >= 0] = CLIENT
    return FederationPlan(names, domain, role, client, unused)


def partition_clients(
    pool: np.ndarray,
    domain: np.ndarray,
    names: Sequence[str],
    num_clients: int,
    split: str,
    alpha: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Deal the client pool to clients.

    ``non-iid``: one domain per client; clients take the non-server domains round-robin (the
    server domain, code 0, joins only if clients outnumber the other domains), and a domain's
    images are split evenly across its clients. ``iid``: the pool is shuffled and dealt evenly.
    ``dirichlet``: per domain, proportions over clients ~ Dir(alpha); a client left empty takes
    one image from the currently largest client.

    Parameters
    ----------
    pool : np.ndarray
        Indices of the client-pool records.
    domain : np.ndarray
        Domain code of every record (code 0 is the server domain).
    names : sequence of str
        Domain names by code.
    num_clients : int
    split : {"non-iid", "iid", "dirichlet"}
    alpha : float
        Dirichlet concentration.
    rng : np.random.Generator

    Returns
    -------
    client : np.ndarray
        ``(N,)`` partition id per record, -1 where none.
    unused : dict
        Pool images no client got, per domain with the reason.

    Raises
    ------
    FederationError
        If some client would get no image.
    """
    client = np.full(len(domain), -1, np.int64)
    unused: dict = {}
    if split == "non-iid":
        _deal_non_iid(pool, domain, names, num_clients, rng, client, unused)
    else:
        if len(pool) < num_clients:
            raise FederationError(f"{num_clients} clients but only {len(pool)} client images; use fewer clients")
        if split == "iid":
            client[rng.permutation(pool)] = np.repeat(np.arange(num_clients), even_sizes(len(pool), num_clients))
        else:
            _deal_dirichlet(pool, domain, num_clients, alpha, rng, client)
    return client, unused


def _deal_non_iid(pool, domain, names, num_clients, rng, client, unused) -> None:
    counts = np.bincount(domain[pool], minlength=len(names))
    others = [c for c in range(1, len(names)) if counts[c] > 0]
    leftover_server = int(counts[0])
    client_domains = list(others)
    if leftover_server and num_clients > len(others):
        client_domains.append(0)
    elif leftover_server:
        unused[names[0]] = {
            "count": leftover_server,
            "reason": "server-domain training images not on the server (clients do not outnumber the other domains)",
        }
    if not client_domains:
        raise FederationError("no images are left for clients (every training image is on the server)")
    for j, code in enumerate(client_domains):
        owners = np.arange(j, num_clients, len(client_domains))
        members = rng.permutation(pool[domain[pool] == code])
        if len(owners) == 0:
            unused[names[code]] = {
                "count": len(members),
                "reason": f"no client for this domain ({num_clients} clients, {len(client_domains)} client domains)",
            }
            continue
        if len(members) < len(owners):
            raise FederationError(
                f"domain {names[code]!r} has {len(members)} client images for {len(owners)} clients; use fewer clients"
            )
        client[members] = np.repeat(owners, even_sizes(len(members), len(owners)))


def _deal_dirichlet(pool, domain, num_clients, alpha, rng, client) -> None:
    for code in np.unique(domain[pool]):
        members = rng.permutation(pool[domain[pool] == code])
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        counts = largest_remainder_counts(proportions, len(members))
        client[members] = np.repeat(np.arange(num_clients), counts)
    totals = np.bincount(client[pool], minlength=num_clients)
    for empty in np.flatnonzero(totals == 0):
        donor = int(np.argmax(totals))
        moved = np.flatnonzero(client == donor)[-1]
        client[moved] = empty
        totals[donor] -= 1
        totals[empty] += 1


# --------------------------------------------------------------------------------------------
# Writing


def manifest_file_path(path: str | Path, root: Path) -> str:
    """How an image path is stored: relative to ``root`` when inside it, else absolute (POSIX)."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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
) -> Path:
    """Build a federation from labelled records and write ``out_dir/federation.json``.

    Parameters
    ----------
    records : sequence of ImageRecord
        Labelled images (e.g. from :func:`detection.datasets.read_yolo_dataset`).
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

    Returns
    -------
    Path
        The manifest file.

    Raises
    ------
    FederationError
        On an impossible configuration (see :func:`plan_federation`).
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
    }
    manifest = {key: manifest[key] for key in MANIFEST_KEYS}
    path = root / MANIFEST_NAME
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(dump_manifest(manifest), encoding="utf-8")
    os.replace(tmp, path)
    return path


def dump_manifest(manifest: dict) -> str:
    """Manifest as JSON text: readable structure, one line per image entry (keeps diffs and size small)."""

    def dump(value, indent: str) -> str:
        inner = indent + " "
        if isinstance(value, list) and value and all(isinstance(v, dict) and "file" in v for v in value):
            return "[\n" + ",\n".join(inner + json.dumps(v) for v in value) + "\n" + indent + "]"
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            text = json.dumps(value)
            if len(text) <= 100:
                return text
        if isinstance(value, dict) and value:
            items = (f"{inner}{json.dumps(str(k))}: {dump(v, inner)}" for k, v in value.items())
            return "{\n" + ",\n".join(items) + "\n" + indent + "}"
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            return "[\n" + ",\n".join(inner + dump(v, inner) for v in value) + "\n" + indent + "]"
        return json.dumps(value)

    return dump(manifest, "") + "\n"


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


# --------------------------------------------------------------------------------------------
# Loading


class Federation:
    """A loaded, validated federation manifest.

    Use :meth:`load`. Client images are exposed as paths only (:meth:`client_images`); their
    true labels only through the explicitly named :meth:`client_hidden_records`.
    """

    def __init__(self, manifest: dict, path: Path) -> None:
        self.path = path
        self.root = path.parent
        self._manifest = manifest

    @classmethod
    def load(cls, path: str | Path, check_files: bool = True) -> "Federation":
        """Read and validate a manifest.

        Parameters
        ----------
        path : str or Path
            ``federation.json`` or the folder holding it.
        check_files : bool
            Check that every referenced image exists (default).

        Returns
        -------
        Federation

        Raises
        ------
        FileNotFoundError
            If there is no manifest at ``path``.
        FederationError
            If the manifest is malformed (the key is named) or images are missing (the first few
            and the count are named).
        """
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no federation manifest at {path}")
        path = Path(os.path.abspath(path))
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FederationError(f"{path}: not valid JSON ({err})") from None
        _validate_manifest(manifest, path)
        federation = cls(manifest, path)
        if check_files:
            federation.check_files()
        return federation

    def resolve(self, file: str) -> str:
        """Absolute path of a manifest ``file`` entry (relative ones are relative to the manifest)."""
        return os.path.normpath(os.path.join(self.root, file))

    def check_files(self) -> None:
        """Raise :class:`FederationError` if any referenced image is missing."""
        files = [self.resolve(entry["file"]) for entry in self._all_entries()]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FederationError(
                f"{self.path}: {len(missing)} of {len(files)} image files it references are missing, "
                f"e.g. {', '.join(missing[:3])}"
            )

    def _all_entries(self):
        yield from self._manifest["server"]["images"]
        for node in self._manifest["clients"]:
            yield from node["images"]
        for entries in self._manifest["test"].values():
            yield from entries

    # -- properties ----------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self._manifest["class_names"])

    @property
    def domains(self) -> list[str]:
        return list(self._manifest["domains"])

    @property
    def server_domain(self) -> str:
        return self._manifest["server_domain"]

    @property
    def num_clients(self) -> int:
        return len(self._manifest["clients"])

    @property
    def split(self) -> str:
        return self._manifest["split"]

    @property
    def seed(self) -> int:
        return self._manifest["seed"]

    @property
    def unused(self) -> dict:
        return dict(self._manifest["unused"])

    @property
    def report(self) -> dict:
        """The reader's skip report, as stored (``{reason: {"count", "examples"}}``)."""
        return dict(self._manifest["report"])

    @property
    def created_by(self) -> dict:
        return dict(self._manifest["created_by"])

    # -- accessors -----------------------------------------------------------------------------

    def sizes(self) -> dict:
        """Image counts: ``{"server": n, "clients": [n0, n1, ...], "test": {domain: n}}``."""
        return {
            "server": len(self._manifest["server"]["images"]),
            "clients": [len(node["images"]) for node in self._manifest["clients"]],
            "test": {domain: len(entries) for domain, entries in self._manifest["test"].items()},
        }

    def server_records(self) -> list[ImageRecord]:
        """The server's labelled images."""
        return [self._record(e, e["labels"], self.server_domain) for e in self._manifest["server"]["images"]]

    def client_images(self, pid: int) -> list[str]:
        """Image paths of client ``pid`` (no labels: this is what training may see)."""
        return [self.resolve(e["file"]) for e in self._client(pid)["images"]]

    def client_hidden_records(self, pid: int) -> list[ImageRecord]:
        """Client ``pid``'s images with their true labels, for evaluation and diagnostics only."""
        return [self._record(e, e["hidden_labels"], e["domain"]) for e in self._client(pid)["images"]]

    def client_domain_counts(self, pid: int) -> dict[str, int]:
        """Images per domain of client ``pid``."""
        return dict(self._client(pid)["domains"])

    def client_domain(self, pid: int) -> str:
        """The dominant domain of client ``pid`` (ties: the one first in :attr:`domains`)."""
        counts = self._client(pid)["domains"]
        order = {d: i for i, d in enumerate(self.domains)}
        return max(counts, key=lambda d: (counts[d], -order.get(d, len(order))))

    def test_records(self, domain: str | None = None) -> dict[str, list[ImageRecord]]:
        """Labelled test images per domain (all domains, or only ``domain``)."""
        test = self._manifest["test"]
        if domain is not None and domain not in test:
            raise FederationError(f"{self.path}: no test split for domain {domain!r}; domains: {list(test)}")
        wanted = [domain] if domain is not None else list(test)
        return {d: [self._record(e, e["labels"], d) for e in test[d]] for d in wanted}

    def all_train_records(self) -> list[ImageRecord]:
        """Server and client images with true labels (the ``full`` upper-bound baseline)."""
        records = self.server_records()
        for pid in range(self.num_clients):
            records += self.client_hidden_records(pid)
        return records

    def _client(self, pid: int) -> dict:
        if not 0 <= int(pid) < self.num_clients:
            raise FederationError(f"{self.path}: partition id {pid} out of range 0..{self.num_clients - 1}")
        return self._manifest["clients"][int(pid)]

    def _record(self, entry: dict, labels: list, domain: str) -> ImageRecord:
        return ImageRecord.from_labels(self.resolve(entry["file"]), labels, domain)

    def __repr__(self) -> str:
        return f"Federation({self.path}, {self.num_clients} clients, domains={self.domains})"


def _validate_manifest(manifest, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise FederationError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise FederationError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise FederationError(f"{path}: missing key(s) {missing}")
    if manifest["paths"] != "relative":
        raise FederationError(f"{path}: 'paths' must be 'relative', got {manifest['paths']!r}")
    num_classes = len(manifest["class_names"])
    _check_entries(manifest["server"].get("images"), "labels", num_classes, f"{path}: server.images")
    if not isinstance(manifest["clients"], list):
        raise FederationError(f"{path}: 'clients' must be a list")
    for pid, node in enumerate(manifest["clients"]):
        where = f"{path}: clients[{pid}]"
        if not isinstance(node, dict) or node.get("partition_id") != pid:
            raise FederationError(f"{where}: partition_id must be {pid}")
        if not isinstance(node.get("domains"), dict):
            raise FederationError(f"{where}: 'domains' must be a mapping domain -> count")
        _check_entries(node.get("images"), "hidden_labels", num_classes, f"{where}.images")
    if not isinstance(manifest["test"], dict):
        raise FederationError(f"{path}: 'test' must be a mapping domain -> images")
    for domain, entries in manifest["test"].items():
        _check_entries(entries, "labels", num_classes, f"{path}: test[{domain!r}]")


def _check_entries(entries, label_key: str, num_classes: int, where: str) -> None:
    if not isinstance(entries, list):
        raise FederationError(f"{where}: must be a list of images")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise FederationError(f"{where}[{k}]: needs a 'file' string")
        rows = entry.get(label_key)
        if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != 5 for r in rows):
            raise FederationError(f"{where}[{k}] ({entry['file']}): '{label_key}' must be a list of [c, x, y, w, h]")
        if any(not 0 <= r[0] < num_classes for r in rows):
            raise FederationError(f"{where}[{k}] ({entry['file']}): class id outside 0..{num_classes - 1}")
