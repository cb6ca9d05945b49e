"""Prepare the built-in synthetic weather federation when a run asks for one that does not exist yet.

Used by ``fedsto run`` before it submits (so parallel runs never race) and by the ServerApp itself
(so ``flwr run . local --run-config presets/demo.toml`` works on a fresh machine). A lock file
serialises concurrent builders; the manifest is written last, atomically, so its presence means
the federation is complete.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("fedsto.server")


def ensure_synthetic_federation(manifest: Path, *, num_images: int, imgsz: int, num_clients: int,
                                weathers: Sequence[str], server_fraction: float = 0.25, test_fraction: float = 0.15,
                                seed: int = 0) -> tuple[Path, bool]:
    """Build a synthetic weather federation at ``manifest`` unless it exists.

    Parameters
    ----------
    manifest : Path
        ``.../federation.json``; its folder receives the scenes (``source/``) and weather images.
    num_images : int
        Synthetic scenes (split into test, server and client images by the fractions).
    imgsz : int
        Scene side in pixels.
    num_clients : int
        Clients (the non-IID split gives each one weather domain, round-robin).
    weathers : sequence of str
        Client domains (the server's is ``clear``).
    server_fraction, test_fraction : float
        As in :func:`detection.federation.build_federation`.
    seed : int
        Scene and split seed.

    Returns
    -------
    (Path, bool)
        The manifest and whether it was built now.
    """
    manifest = Path(manifest)
    wanted = {"num_clients": int(num_clients), "weathers": list(weathers), "server_fraction": server_fraction,
              "test_fraction": test_fraction}
    if manifest.exists():
        if num_images > 0:  # a synthetic run: the manifest must be the one it asks for
            check_synthetic_federation(manifest, wanted)
        return manifest, False
    if num_images <= 0:
        raise FileNotFoundError(f"no federation manifest at {manifest} (and synthetic-images=0, so none is built); "
                                "build one with `fedsto data federate` or point run-config 'federation' at it")
    folder = manifest.parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the manifest
        if manifest.exists():
            check_synthetic_federation(manifest, wanted)
            return manifest, False
        from detection.federation import build_federation
        from detection.synthetic import SYNTHETIC_CLASSES, write_synthetic_dataset
        from detection.yolo import read_yolo_dataset

        log.info("building synthetic weather federation at %s (%d scenes, %d px, %d clients, %s)", folder, num_images,
                 imgsz, num_clients, ",".join(weathers))
        source = folder / "source"
        if source.exists():
            shutil.rmtree(source)  # a half-written one from an interrupted build
        write_synthetic_dataset(source, num_images=num_images, imgsz=imgsz, seed=seed, progress=False)
        records, _, report = read_yolo_dataset(source, splits=["train"], class_names=list(SYNTHETIC_CLASSES))
        built = build_federation(records, list(SYNTHETIC_CLASSES), folder, domain_rule="weather", server_domain="clear",
                                 server_fraction=server_fraction, num_clients=num_clients, test_fraction=test_fraction,
                                 seed=seed, weathers=list(weathers), progress=False, report=report)
        if built != manifest:
            raise RuntimeError(f"federation written to {built}, expected {manifest}")
    return manifest, True


def check_synthetic_federation(manifest: Path, wanted: dict) -> None:
    """Refuse to reuse a manifest built with other synthetic settings (another run's federation).

    Only manifests made by the weather rule are checked; a user's own federation is used as is.
    """
    created = json.loads(Path(manifest).read_text(encoding="utf-8")).get("created_by", {})
    if created.get("domain_rule") != "weather":
        return
    differing = {k: (created.get(k), v) for k, v in wanted.items() if created.get(k) != v}
    if differing:
        text = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in differing.items())
        raise ValueError(f"{manifest} was built with other synthetic settings ({text}); point run-config "
                         "'federation' at another folder or delete that one")
