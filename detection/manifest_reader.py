"""The :class:`Federation`: a loaded, validated federation manifest and what each site holds.

The server's labelled images, each client's image paths (their true labels only through the
explicitly named :meth:`Federation.client_hidden_records`) and the labelled test split per domain.
The file format and its validation are in :mod:`detection.manifest`.
"""

from __future__ import annotations

import os
from pathlib import Path

from detection.manifest import MANIFEST_NAME, FederationError, read_manifest, validate_manifest
from detection.records import ImageRecord


def check_files_exist(manifest: str | Path, files: list[str]) -> None:
    """Raise :class:`FederationError` naming ``manifest`` and the first missing ``files``."""
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FederationError(f"{manifest}: {len(missing)} of {len(files)} image files it references are missing, "
                              f"e.g. {', '.join(missing[:3])}")


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
            If the manifest is malformed (``<file>: <JSON path>: <what was expected>``, see
            :func:`detection.manifest.validate_manifest`) or images are missing (the first few
            and the count are named).
        """
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no federation manifest at {path}")
        path = Path(os.path.abspath(path))
        manifest = read_manifest(path)
        validate_manifest(manifest, path)
        federation = cls(manifest, path)
        if check_files:
            federation.check_files()
        return federation

    def resolve(self, file: str) -> str:
        """Absolute path of a manifest ``file`` entry (relative ones are relative to the manifest)."""
        return os.path.normpath(os.path.join(self.root, file))

    def check_files(self) -> None:
        """Raise :class:`FederationError` if any referenced image is missing."""
        check_files_exist(self.path, [self.resolve(entry["file"]) for entry in self._all_entries()])

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

    def client_entries(self, pid: int) -> list[dict]:
        """Client ``pid``'s manifest entries as they are (``file`` relative to the manifest, hidden labels included)."""
        return list(self._client(pid)["images"])

    def test_entries(self) -> dict[str, list[dict]]:
        """The test split's manifest entries per domain, as they are."""
        return {d: list(entries) for d, entries in self._manifest["test"].items()}

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
