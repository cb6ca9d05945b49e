"""What one site holds: the server's labelled images and test splits, or one client's unlabelled images.

A deployed site sees only its own files. :func:`write_site_manifests` derives one site manifest
per site from the federation manifest (``site-server.json``, ``site-client-<i>.json`` beside
``federation.json``); :func:`export_site` copies one site's manifest and files into a folder of
its own, which is all that site's containers mount. The loaders return the same two views
whether they read a site manifest (deployment) or the full manifest (simulation), so the server
and the client run one code path; only the full manifest carries a client's hidden labels, used
for diagnostics in simulation and never in deployment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from detection.atomic import atomic_write_text
from detection.manifest import (
    CLIENT_SITE_FORMAT,
    CLIENT_SITE_KEYS,
    FORMAT,
    MANIFEST_NAME,
    SERVER_SITE_FORMAT,
    SERVER_SITE_KEYS,
    SITE_NAME,
    FederationError,
    dump_manifest,
    read_manifest,
    read_manifest_text,
    validate_manifest,
    validate_site_manifest,
)
from detection.manifest_reader import Federation, check_files_exist
from detection.records import ImageRecord
from detection.seeds import derive_seed

SERVER_SITE = "server"
HOLDOUT_STREAM = 0x401D  # seed stream of the hold-out draw (apart from the split's streams)


def client_site_name(partition_id: int) -> str:
    return f"client-{int(partition_id)}"


def site_manifest_name(site: str) -> str:
    """File name of a site's manifest beside ``federation.json``."""
    return f"site-{site}.json"


@dataclass(frozen=True)
class ServerSite:
    """The server's data: labelled images, labelled test splits per domain, the client count.

    ``deployed`` is True when it was read from a server site manifest: no client's labels exist
    anywhere on this site, so the ``full`` baseline cannot run.
    """

    path: Path
    class_names: list[str]
    domains: list[str]
    server_domain: str
    num_clients: int
    labelled: list[ImageRecord]
    tests: dict[str, list[ImageRecord]]
    federation_id: str
    deployed: bool
    federation: Federation | None = None  # simulation only: the full manifest (``full``, client sizes)

    def sizes(self) -> dict:
        if self.federation is not None:
            return self.federation.sizes()
        return {"server": len(self.labelled), "clients": None, "test": {d: len(r) for d, r in self.tests.items()}}

    def all_train_records(self) -> list[ImageRecord]:
        """Every training image with its true label (the ``full`` baseline; simulation only)."""
        if self.federation is None:
            raise FederationError(f"{self.path}: method 'full' needs every client's labels in one place; a server site "
                                  "manifest has none (run 'full' in simulation, on the federation manifest)")
        return self.federation.all_train_records()

    def check_files(self) -> None:
        check_files_exist(self.path, [r.path for r in self.labelled] + [r.path for rs in self.tests.values() for r in rs])


@dataclass(frozen=True)
class ClientSite:
    """One client's data: its unlabelled images and, where it has one, a labelled evaluation set.

    Parameters
    ----------
    images : list of str
        Absolute image paths; what training sees.
    hidden : list of ImageRecord or None
        The same images with their true labels, for diagnostics (simulation only; None on a
        deployed site, where no labels exist).
    eval_records : list of ImageRecord
        What the site evaluates on: its own labelled hold-out (deployment), or its domain's test
        split (simulation). May be empty.
    """

    path: Path
    partition_id: int
    class_names: list[str]
    domain: str
    images: list[str]
    hidden: list[ImageRecord] | None
    eval_records: list[ImageRecord]
    federation_id: str
    deployed: bool

    def check_files(self) -> None:
        check_files_exist(self.path, self.images + [r.path for r in self.eval_records])


def federation_id(manifest_text: str) -> str:
    """Content hash of a federation manifest's text (16 hex): every site of one federation carries it."""
    return hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()[:16]


def dominant_domain(counts: dict[str, int], domains: list[str]) -> str:
    """The domain with the most images (ties: the one first in ``domains``)."""
    order = {d: i for i, d in enumerate(domains)}
    return max(counts, key=lambda d: (counts[d], -order.get(d, len(order))))


# --------------------------------------------------------------------------------------------
# Loading


def _manifest_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (MANIFEST_NAME, SITE_NAME):
            if (path / name).is_file():
                return Path(os.path.abspath(path / name))
        raise FileNotFoundError(f"no {MANIFEST_NAME} or {SITE_NAME} in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no federation or site manifest at {path}")
    return Path(os.path.abspath(path))


def _check_site(manifest: dict, path: Path, role: str) -> dict:
    got = validate_site_manifest(manifest, path)
    if got != role:
        raise FederationError(f"{path}: a {got} site manifest ({manifest['site']!r}), expected a {role} site's")
    return manifest


def _federation(manifest: dict, file: Path) -> Federation:
    """The full manifest, validated, without its files checked (each site checks only its own)."""
    validate_manifest(manifest, file)
    return Federation(manifest, file)


def load_server_site(path: str | Path, check_files: bool = True) -> ServerSite:
    """The server's view of a federation manifest or of a server site manifest.

    Raises
    ------
    FileNotFoundError
        No manifest at ``path``.
    FederationError
        A malformed manifest, a client's site manifest, or missing image files (with
        ``check_files``; only the server's own files are checked).
    """
    file = _manifest_file(path)
    parsed = _parsed_federation(str(file), *_stamp(file))  # shared with write_partition_index: parsed once
    if parsed is not None:
        fed, fed_id = parsed
        site = ServerSite(file, fed.class_names, fed.domains, fed.server_domain, fed.num_clients, fed.server_records(),
                          fed.test_records(), fed_id, deployed=False, federation=fed)
    else:
        manifest, _ = read_manifest_text(file)
        m = _check_site(manifest, file, SERVER_SITE)
        root = file.parent
        site = ServerSite(file, list(m["class_names"]), list(m["domains"]), m["server_domain"], m["num_clients"],
                          [_record(root, e, e["labels"], m["server_domain"]) for e in m["images"]],
                          {d: [_record(root, e, e["labels"], d) for e in entries] for d, entries in m["test"].items()},
                          m["federation_id"], deployed=True)
    if check_files:
        site.check_files()
    return site


def load_client_site(path: str | Path, partition_id: int | None = None, check_files: bool = True) -> ClientSite:
    """Client ``partition_id``'s view of a federation manifest, or the client of a client site manifest.

    Parameters
    ----------
    path : str or Path
        ``federation.json`` (simulation: ``partition_id`` required), a client site manifest or
        the folder holding one (deployment: ``partition_id`` optional, and if given it must match).
    partition_id : int, optional
    check_files : bool
        Check that this client's own files exist (no other site's are looked at).

    Raises
    ------
    FileNotFoundError, FederationError
        As :func:`load_server_site`; also a partition id that does not match the site manifest.
    """
    file = _manifest_file(path)
    indexed = _indexed_client_site(file, partition_id) if partition_id is not None else None
    if indexed is not None:
        site = indexed
    elif (parsed := _parsed_federation(str(file), *_stamp(file))) is not None:
        if partition_id is None:
            raise FederationError(f"{file}: a federation manifest holds every client; the node needs a partition-id")
        fed, fed_id = parsed
        domain = fed.client_domain(partition_id)
        site = ClientSite(file, int(partition_id), fed.class_names, domain, fed.client_images(partition_id),
                          fed.client_hidden_records(partition_id), fed.test_records(domain)[domain], fed_id,
                          deployed=False)
    else:
        manifest, _ = read_manifest_text(file)
        m = _check_site(manifest, file, "client")
        if partition_id is not None and int(partition_id) != m["partition_id"]:
            raise FederationError(f"{file}: site {m['site']!r} is partition {m['partition_id']}, but the node config "
                                  f"says partition-id={partition_id}")
        root = file.parent
        counts: dict[str, int] = {}
        for e in m["images"]:
            counts[e["domain"]] = counts.get(e["domain"], 0) + 1
        domain = dominant_domain(counts, list(m["domains"]))
        site = ClientSite(file, m["partition_id"], list(m["class_names"]), domain,
                          [os.path.normpath(os.path.join(root, e["file"])) for e in m["images"]], None,
                          [_record(root, e, e["labels"], domain) for e in m["holdout"]], m["federation_id"],
                          deployed=True)
    if check_files:
        site.check_files()
    return site


def _stamp(file: Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=2)
def _parsed_federation(file: str, mtime_ns: int, size: int) -> tuple[Federation, str] | None:
    """A federation manifest parsed and validated once per process (None: a site manifest).

    A simulation actor serves many partitions one after the other; parsing the whole manifest
    for each would cost more than their rounds at a thousand clients. The key includes the
    file's modification time and size, so a rewritten manifest is read again.
    """
    manifest, text = read_manifest_text(Path(file))
    if manifest.get("format") != FORMAT:
        return None
    return _federation(manifest, Path(file)), federation_id(text)


# --------------------------------------------------------------------------------------------
# Partition index: one small file per client, so a simulation process reads only its own


PARTITION_INDEX = ".partitions"  # beside federation.json
INDEX_COMPLETE = "complete"


def partition_index_folder(manifest_file: str | Path) -> Path:
    """Where the index of this exact manifest file lives (its modification time and size in the name).

    A rewritten or copied manifest has another stamp, so an index never outlives its manifest.
    """
    file = Path(manifest_file)
    mtime_ns, size = _stamp(file)
    return file.parent / PARTITION_INDEX / f"{file.stem}-{mtime_ns}-{size}"


def write_partition_index(path: str | Path) -> Path | None:
    """Split a federation manifest into ``client-<pid>.json`` and ``test-<domain>.json`` (once per manifest).

    A Ray actor serves partitions one after the other; with the index it parses only theirs
    (its images, hidden labels and its domain's test split) instead of the whole manifest, so its
    memory follows the partitions it serves, not the federation's size. The ServerApp writes it
    before any client round; a client without one (another file system, an older run) parses the
    full manifest once per process instead. Returns the folder, or None for a site manifest.
    """
    file = _manifest_file(path)
    folder = partition_index_folder(file)
    if (folder / INDEX_COMPLETE).is_file():
        return folder
    parsed = _parsed_federation(str(file), *_stamp(file))
    if parsed is None:
        return None
    fed, fed_id = parsed
    for stale in folder.parent.glob(f"{file.stem}-*"):  # indexes of earlier versions of this manifest
        shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    common = {"federation_id": fed_id, "class_names": fed.class_names}
    for pid in range(fed.num_clients):
        entry = {**common, "partition_id": pid, "domain": fed.client_domain(pid), "images": fed.client_entries(pid)}
        atomic_write_text(folder / f"client-{pid}.json", json.dumps(entry))
    for domain, entries in fed.test_entries().items():
        atomic_write_text(folder / f"test-{domain}.json", json.dumps(entries))
    atomic_write_text(folder / INDEX_COMPLETE, f"{fed.num_clients}\n")  # last: a partial index is never used
    return folder


@lru_cache(maxsize=8)
def _indexed_test_records(folder: str, domain: str, root: str) -> list[ImageRecord]:
    entries = json.loads((Path(folder) / f"test-{domain}.json").read_text())
    return [_record(Path(root), e, e["labels"], domain) for e in entries]


def _indexed_client_site(file: Path, partition_id: int) -> ClientSite | None:
    """Client ``partition_id`` from the manifest's partition index (None: no index, or no such partition)."""
    root = file.parent
    try:
        folder = partition_index_folder(file)
        if not (folder / INDEX_COMPLETE).is_file():
            return None
        entry = json.loads((folder / f"client-{int(partition_id)}.json").read_text())
        test = _indexed_test_records(str(folder), entry["domain"], str(root))
    except (OSError, ValueError, KeyError):  # the full manifest then says what is wrong
        return None
    return ClientSite(file, int(partition_id), list(entry["class_names"]), entry["domain"],
                      [os.path.normpath(os.path.join(root, e["file"])) for e in entry["images"]],
                      [_record(root, e, e["hidden_labels"], e["domain"]) for e in entry["images"]],
                      test, entry["federation_id"], deployed=False)


def _record(root: Path, entry: dict, labels: list, domain: str) -> ImageRecord:
    return ImageRecord.from_labels(os.path.normpath(os.path.join(root, entry["file"])), labels, domain)


# --------------------------------------------------------------------------------------------
# Writing and exporting


def site_manifests(manifest: dict, fed_id: str, holdout: int = 0, seed: int = 0) -> dict[str, dict]:
    """Site name -> site manifest, derived from a (validated) federation manifest.

    Parameters
    ----------
    manifest : dict
        The federation manifest.
    fed_id : str
        Its :func:`federation_id`.
    holdout : int
        Labelled hold-out images per client site, drawn (seeded) from the client's own images and
        removed from its training images; 0: none. At least one training image must remain.
    seed : int
        Seed of the hold-out draw.
    """
    common = {"federation_id": fed_id, "class_names": manifest["class_names"], "domains": manifest["domains"]}
    out = {SERVER_SITE: {"format": SERVER_SITE_FORMAT, "site": SERVER_SITE, **common,
                         "server_domain": manifest["server_domain"], "num_clients": len(manifest["clients"]),
                         "paths": "relative", "images": manifest["server"]["images"], "test": manifest["test"]}}
    for node in manifest["clients"]:
        pid, images = node["partition_id"], node["images"]
        if holdout and holdout >= len(images):
            raise FederationError(f"client {pid} holds {len(images)} images; a hold-out of {holdout} would leave none to "
                                  "train on (lower --site-holdout)")
        rng = np.random.default_rng(derive_seed(seed, pid, HOLDOUT_STREAM))
        held = set(rng.choice(len(images), size=holdout, replace=False).tolist()) if holdout else set()
        name = client_site_name(pid)
        out[name] = {"format": CLIENT_SITE_FORMAT, "site": name, **common, "partition_id": pid, "paths": "relative",
                     "images": [{"file": e["file"], "domain": e["domain"]} for i, e in enumerate(images) if i not in held],
                     "holdout": [{"file": e["file"], "labels": e["hidden_labels"]} for i, e in enumerate(images) if i in held]}
    keys = {SERVER_SITE_FORMAT: SERVER_SITE_KEYS, CLIENT_SITE_FORMAT: CLIENT_SITE_KEYS}
    return {name: {k: m[k] for k in keys[m["format"]]} for name, m in out.items()}


def write_site_manifests(manifest: dict, manifest_text: str, folder: str | Path, holdout: int = 0) -> list[Path]:
    """Write ``site-<name>.json`` for every site into the federation's folder; returns the files.

    Called before ``federation.json`` itself is written, so a complete manifest implies its sites.
    """
    for stale in Path(folder).glob("site-*.json"):  # sites of an earlier federation in this folder
        stale.unlink()
    written = []
    for name, site in site_manifests(manifest, federation_id(manifest_text), holdout, manifest["seed"]).items():
        target = Path(folder) / site_manifest_name(name)
        validate_site_manifest(site, target)
        written.append(atomic_write_text(target, dump_manifest(site)))
    return written


def export_site(federation: str | Path, site: str, out: str | Path, progress: bool = True) -> Path:
    """Copy one site's manifest and files into ``out`` (``out/site.json`` and the images).

    Parameters
    ----------
    federation : str or Path
        ``federation.json`` or its folder; its site manifests must exist (``fedsto data federate``
        writes them).
    site : str
        ``server`` or ``client-<i>``.
    out : str or Path
        A new or empty folder: nothing of another site may end up there.
    progress : bool
        Progress bar while copying.

    Returns
    -------
    Path
        ``out/site.json``; image paths in it are relative to ``out``.

    Raises
    ------
    FederationError, FileNotFoundError
        Unknown site, missing site manifest or image, a non-empty ``out``.
    """
    file = _manifest_file(federation)
    source = file.parent / site_manifest_name(site)
    if not source.is_file():
        known = sorted(p.name[5:-5] for p in file.parent.glob("site-*.json"))
        raise FederationError(f"no site {site!r} in {file.parent} (sites: {', '.join(known) or 'none; re-run fedsto data federate'})")
    manifest = read_manifest(source)
    validate_site_manifest(manifest, source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FederationError(f"{out} is not empty; export a site into a new folder so nothing else is mounted with it")
    entries = [e for key in ("images", "holdout") for e in manifest.get(key, [])]
    entries += [e for rs in manifest.get("test", {}).values() for e in rs]
    jobs = []
    for k, entry in enumerate(entries):
        src = Path(os.path.normpath(os.path.join(source.parent, entry["file"])))
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts:  # outside the federation folder: give it a local name
            rel = Path("files") / f"{k:06d}_{src.name}"
            entry["file"] = rel.as_posix()
        jobs.append((src, out / rel))
    check_files_exist(source, [str(src) for src, _ in jobs])
    iterable = jobs
    if progress and jobs:
        from rich.progress import track

        iterable = track(jobs, description=f"export {site}")
    for src, dst in iterable:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    validate_site_manifest(manifest, out / SITE_NAME)
    return atomic_write_text(out / SITE_NAME, dump_manifest(manifest))


def describe_site(path: str | Path) -> str:
    """One line about a site manifest (for the CLI)."""
    file = _manifest_file(path)
    m = read_manifest(file)
    role = validate_site_manifest(m, file)
    if role == SERVER_SITE:
        tests = sum(len(v) for v in m["test"].values())
        return f"server site: {len(m['images'])} labelled images, {tests} test images, {m['num_clients']} clients"
    return (f"{m['site']} (partition {m['partition_id']}): {len(m['images'])} unlabelled images, "
            f"{len(m['holdout'])} labelled hold-out images")
