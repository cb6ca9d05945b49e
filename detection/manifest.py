"""The federation manifest file: its layout, its text form, and the check every load runs.

The manifest (``federation.json``) is the single source of truth for "who holds what": which
images the server holds with labels, which each client holds without labels, and the labelled
test split per domain. :func:`detection.federation.build_federation` writes it once, offline;
:class:`detection.manifest_reader.Federation` loads it for training and evaluation, after
:func:`validate_manifest` has checked it.

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

Clients' true labels are kept as ``hidden_labels`` for evaluation and diagnostics only.

Site manifests (:mod:`detection.sites`) hold what one site may see, with paths relative to their
own folder like the main manifest::

    {"format": "fedsto-site-server/1", "site": "server", "federation_id": "<16 hex>",
     "class_names": [...], "domains": [...], "server_domain": "clear", "num_clients": 3,
     "paths": "relative", "images": [{"file": ..., "labels": [...]}], "test": {"clear": [...], ...}}
    {"format": "fedsto-site-client/1", "site": "client-0", "federation_id": "<16 hex>",
     "partition_id": 0, "class_names": [...], "domains": [...], "paths": "relative",
     "images": [{"file": ..., "domain": "rainy"}], "holdout": [{"file": ..., "labels": [...]}]}

A client site holds no labels except its own optional ``holdout``; it knows nothing of the other
sites. :func:`validate_site_manifest` checks them with the same rules and messages.

Validation rejects anything else with a one-line :class:`FederationError` of the form
``<manifest>: <JSON path>: <what was expected>``, the JSON path written as in
``test.clear[0].labels[2]`` or ``clients[1].images``. Beyond types it checks that every
label row is ``[class, x, y, w, h]`` with an integer class id in range and a finite box of
positive size inside the image; that every domain named anywhere is one of ``domains``; that
client ``i`` has ``partition_id`` ``i``, at least one image, and per-domain counts that match its
images; and that no image file is listed twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from pathlib import Path
from typing import NoReturn

FORMAT = "fedsto-federation/1"
MANIFEST_NAME = "federation.json"
SERVER_SITE_FORMAT = "fedsto-site-server/1"
CLIENT_SITE_FORMAT = "fedsto-site-client/1"
SITE_NAME = "site.json"
"""File name of a site manifest inside an exported site folder (``fedsto data export-site``)."""
SERVER_SITE_KEYS = (
    "format", "site", "federation_id", "class_names", "domains", "server_domain", "num_clients", "paths",
    "images", "test",
)  # fmt: skip
CLIENT_SITE_KEYS = (
    "format", "site", "federation_id", "partition_id", "class_names", "domains", "paths", "images", "holdout",
)  # fmt: skip
SPLITS = ("non-iid", "iid", "dirichlet")
"""Values of the manifest's ``split`` key: how the client pool was dealt (see :mod:`detection.splits`)."""
MANIFEST_KEYS = (
    "format", "created_by", "seed", "class_names", "server_domain", "domains", "split", "paths",
    "server", "clients", "test", "unused", "report",
)  # fmt: skip

BOX_SLACK = 1e-4
"""How far a stored box may reach past the image edge (stored values are rounded to 6 decimals)."""


class FederationError(ValueError):
    """A federation that cannot be built or loaded as asked; the message names the file/key."""


def manifest_file_path(path: str | Path, root: Path) -> str:
    """How an image path is stored: relative to ``root`` when inside it, else absolute (POSIX)."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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


def read_manifest(path: Path) -> dict:
    """Parse a manifest file (not yet validated).

    Raises
    ------
    FederationError
        If the file is not valid UTF-8 JSON (Python's parser also rejects numbers of more than
        4300 digits and nesting deeper than the recursion limit; both are reported the same way).
    """
    return read_manifest_text(path)[0]


def read_manifest_text(path: Path) -> tuple[dict, str]:
    """:func:`read_manifest` plus the file's text (what a federation id hashes), from one read."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text), text
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise FederationError(f"{path}: not valid JSON ({_one_line(err)})") from None
    except RecursionError:
        raise FederationError(f"{path}: not valid JSON (nested too deeply)") from None


# --------------------------------------------------------------------------------------------
# Validation


def validate_manifest(manifest, path: str | Path) -> None:
    """Check a parsed manifest completely (see the module docstring for what is checked).

    Parameters
    ----------
    manifest : object
        What ``json.loads`` returned for the file.
    path : str or Path
        The manifest file, named in every message.

    Raises
    ------
    FederationError
        ``<path>: <JSON path>: <what was expected>`` for the first problem found.
    """
    _Checker(str(path)).manifest(manifest)


def validate_site_manifest(manifest, path: str | Path) -> str:
    """Check a parsed site manifest; return its role, ``"server"`` or ``"client"``.

    Raises
    ------
    FederationError
        ``<path>: <JSON path>: <what was expected>`` for the first problem found (an empty
        ``images`` list included: a site without images cannot take part).
    """
    checker = _Checker(str(path))
    if not isinstance(manifest, dict):
        checker.fail("", f"expected a JSON object, got {_show(manifest)}")
    formats = {SERVER_SITE_FORMAT: "server", CLIENT_SITE_FORMAT: "client"}
    if manifest.get("format") not in formats:
        checker.fail("format", f"expected {SERVER_SITE_FORMAT!r} or {CLIENT_SITE_FORMAT!r}, got {_show(manifest.get('format'))}")
    role = formats[manifest["format"]]
    checker.site(manifest, role)
    return role


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxdict = 5
_SHOW.maxlevel = 2
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}


def json_path(where: str, key: str | int) -> str:
    """``where`` extended by an object key or a list index (``test.clear[0]``, ``test["a b"]``)."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if _KEY.fullmatch(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key)}]"


def _show(value) -> str:
    """A value for a message: its JSON type and a short repr (``string 'car'``, ``number nan``, ``null``)."""
    if value is None:
        return "null"
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {_SHOW.repr(value)}"


def _one_line(value) -> str:
    return " ".join(str(value).split())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, str] = {}  # file -> where it was first listed

    def fail(self, where: str, what: str) -> NoReturn:
        # One line by construction: values are shown with repr(), odd keys with json.dumps().
        raise FederationError(f"{self.path}: {where}: {what}" if where else f"{self.path}: {what}")

    # -- generic ---------------------------------------------------------------------------

    def json_object(self, value, where: str, keys: tuple[str, ...] | None = None) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {_show(value)}")
        if keys is not None:
            for key in keys:
                if key not in value:
                    self.fail(json_path(where, key), "required key is missing")
            for key in value:
                if key not in keys:
                    self.fail(json_path(where, key), f"unexpected key; expected only {', '.join(keys)}")
        return value

    def json_list(self, value, where: str, nonempty: str | None = None) -> list:
        if not isinstance(value, list):
            self.fail(where, f"expected a list, got {_show(value)}")
        if nonempty and not value:
            self.fail(where, f"expected at least one {nonempty}, got an empty list")
        return value

    def string(self, value, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a non-empty string, got {_show(value)}")
        return value

    def count(self, value, where: str, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(where, f"expected an integer >= {minimum}, got {_show(value)}")
        return value

    def names(self, value, where: str, what: str) -> list[str]:
        seen: dict[str, int] = {}
        for k, name in enumerate(self.json_list(value, where, nonempty=what)):
            self.string(name, json_path(where, k))
            if name in seen:
                self.fail(json_path(where, k), f"{name!r} is listed twice (also at {json_path(where, seen[name])})")
            seen[name] = k
        return value

    def domain(self, value, where: str) -> str:
        if self.string(value, where) not in self.domains:
            self.fail(where, f"{value!r} is not one of domains {self.domains}")
        return value

    # -- the manifest ----------------------------------------------------------------------

    def manifest(self, m) -> None:
        if not isinstance(m, dict):
            self.fail("", f"expected a JSON object, got {_show(m)}")
        if "format" not in m:
            self.fail("format", f"required key is missing (expected {FORMAT!r})")
        if m["format"] != FORMAT:
            self.fail("format", f"expected {FORMAT!r}, got {_show(m['format'])}")
        self.json_object(m, "", MANIFEST_KEYS)
        self.json_object(m["created_by"], "created_by")
        self.count(m["seed"], "seed", 0)
        self.class_names = self.names(m["class_names"], "class_names", "class name")
        self.domains = self.names(m["domains"], "domains", "domain")
        if self.string(m["server_domain"], "server_domain") not in self.domains:
            self.fail("server_domain", f"{m['server_domain']!r} is not one of domains {self.domains}")
        if m["split"] not in SPLITS:
            self.fail("split", f"expected one of {', '.join(map(repr, SPLITS))}, got {_show(m['split'])}")
        if m["paths"] != "relative":
            self.fail("paths", f"expected 'relative', got {_show(m['paths'])}")
        server = self.json_object(m["server"], "server", ("domain", "images"))
        if self.string(server["domain"], "server.domain") != m["server_domain"]:
            self.fail("server.domain", f"{server['domain']!r} differs from server_domain {m['server_domain']!r}")
        self.entries(server["images"], "server.images", "labels", nonempty=True)
        for pid, node in enumerate(self.json_list(m["clients"], "clients", nonempty="client")):
            self.client(node, f"clients[{pid}]", pid)
        for domain, entries in self.json_object(m["test"], "test").items():
            where = json_path("test", domain)
            if domain not in self.domains:
                self.fail(where, f"{domain!r} is not one of domains {self.domains}")
            self.entries(entries, where, "labels")
        for domain, node in self.json_object(m["unused"], "unused").items():
            where = json_path("unused", domain)
            if domain not in self.domains:
                self.fail(where, f"{domain!r} is not one of domains {self.domains}")
            node = self.json_object(node, where, ("count", "reason"))
            self.count(node["count"], json_path(where, "count"), 1)
            self.string(node["reason"], json_path(where, "reason"))
        for reason, node in self.json_object(m["report"], "report").items():
            where = json_path("report", reason)
            node = self.json_object(node, where, ("count", "examples"))
            self.count(node["count"], json_path(where, "count"), 1)
            for k, example in enumerate(self.json_list(node["examples"], json_path(where, "examples"))):
                self.string(example, json_path(json_path(where, "examples"), k))

    def site(self, m: dict, role: str) -> None:
        self.json_object(m, "", SERVER_SITE_KEYS if role == "server" else CLIENT_SITE_KEYS)
        name = self.string(m["site"], "site")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            self.fail("site", f"expected lower-case letters, digits and '-', got {_show(name)}")
        if not re.fullmatch(r"[0-9a-f]{16}", str(m["federation_id"])):
            self.fail("federation_id", f"expected 16 hex digits, got {_show(m['federation_id'])}")
        self.class_names = self.names(m["class_names"], "class_names", "class name")
        self.domains = self.names(m["domains"], "domains", "domain")
        if m["paths"] != "relative":
            self.fail("paths", f"expected 'relative', got {_show(m['paths'])}")
        if role == "server":
            if self.string(m["server_domain"], "server_domain") not in self.domains:
                self.fail("server_domain", f"{m['server_domain']!r} is not one of domains {self.domains}")
            self.count(m["num_clients"], "num_clients", 1)
            self.entries(m["images"], "images", "labels", nonempty=True)
            for domain, entries in self.json_object(m["test"], "test").items():
                where = json_path("test", domain)
                if domain not in self.domains:
                    self.fail(where, f"{domain!r} is not one of domains {self.domains}")
                self.entries(entries, where, "labels")
            return
        if type(m["partition_id"]) is not int or m["partition_id"] < 0:
            self.fail("partition_id", f"expected an integer >= 0, got {_show(m['partition_id'])}")
        self.entries(m["images"], "images", None, nonempty=True, client_domains=("domains", dict.fromkeys(self.domains)))
        self.entries(m["holdout"], "holdout", "labels")

    def client(self, node, where: str, pid: int) -> None:
        node = self.json_object(node, where, ("partition_id", "domains", "images"))
        pid_at, domains_at, images_at = (json_path(where, key) for key in ("partition_id", "domains", "images"))
        if type(node["partition_id"]) is not int or node["partition_id"] != pid:
            self.fail(pid_at, f"expected {pid} (its position in clients), got {_show(node['partition_id'])}")
        counts = self.json_object(node["domains"], domains_at)
        if not counts:
            self.fail(domains_at, "expected at least one domain -> image count, got an empty object")
        for domain, n in counts.items():
            self.domain(domain, json_path(domains_at, domain))
            self.count(n, json_path(domains_at, domain), 1)
        self.entries(node["images"], images_at, "hidden_labels", nonempty=True, client_domains=(domains_at, counts))
        held = {d: 0 for d in counts}
        for entry in node["images"]:
            held[entry["domain"]] += 1
        for domain, n in counts.items():
            if held[domain] != n:
                self.fail(json_path(domains_at, domain), f"{n} images, but {images_at} holds {held[domain]} {domain!r} images")

    def entries(self, value, where: str, label_key: str | None, nonempty: bool = False, client_domains=None) -> None:
        keys = ("file", "domain") if client_domains is not None else ("file",)
        keys += (label_key,) if label_key else ()
        for k, entry in enumerate(self.json_list(value, where, nonempty="image" if nonempty else None)):
            at = json_path(where, k)
            entry = self.json_object(entry, at, keys)
            file = self.string(entry["file"], json_path(at, "file"))
            if file in self.files:
                self.fail(json_path(at, "file"), f"{file!r} is listed twice (also at {self.files[file]})")
            self.files[file] = json_path(at, "file")
            if client_domains is not None:
                domains_at, counts = client_domains
                if self.domain(entry["domain"], json_path(at, "domain")) not in counts:
                    self.fail(json_path(at, "domain"), f"{entry['domain']!r} is not among {domains_at} {list(counts)}")
            if label_key:
                rows = json_path(at, label_key)
                for j, row in enumerate(self.json_list(entry[label_key], rows)):
                    self.label(row, json_path(rows, j))

    def label(self, row, where: str) -> None:
        if not isinstance(row, list) or len(row) != 5:
            self.fail(where, f"expected a label row [class, x, y, w, h], got {_show(row)}")
        cls, *box = row
        if not isinstance(cls, int) or isinstance(cls, bool):
            self.fail(where, f"class id must be an integer, got {_show(cls)}")
        if not 0 <= cls < len(self.class_names):
            n = len(self.class_names)
            self.fail(where, f"class id {cls} outside 0..{n - 1} (class_names has {n} names)")
        for name, v in zip("xywh", box):
            if not _is_number(v) or not math.isfinite(v) or not 0 <= v <= 1:
                self.fail(where, f"{name} must be a finite number in [0, 1], got {_show(v)}")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            self.fail(where, f"box width and height must be > 0, got w={w}, h={h}")
        if min(x - w / 2, y - h / 2) < -BOX_SLACK or max(x + w / 2, y + h / 2) > 1 + BOX_SLACK:
            self.fail(where, f"box [x={x}, y={y}, w={w}, h={h}] reaches outside the image [0, 1]")
