"""Image probing: decode each image fully, so missing, corrupt and truncated files are caught.

Used by both dataset readers (:mod:`detection.yolo`, :mod:`detection.bdd100k`); a probe returns the
image size or the skip reason (``missing image``, ``corrupt image``) the reader counts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"})
"""Image file suffixes a reader picks up from a folder (Ultralytics' list minus exotic ones)."""


def probe_image(path: str | Path) -> tuple[int, int] | str:
    """Decode an image fully and return its size, or the reason it is unusable.

    Parameters
    ----------
    path : str or Path
        Image file.

    Returns
    -------
    tuple of int or str
        ``(width, height)`` for a good image, else ``"missing image"`` or ``"corrupt image"``.

    Notes
    -----
    Pillow's ``load()`` raises on a truncated JPEG, whereas ``cv2.imread`` only prints a warning
    and returns a partly grey image, so decoding with Pillow is what catches truncation.
    """
    from PIL import Image

    try:
        with pillow_open()(path) as image:
            size = image.size
            image.load()
    except FileNotFoundError:
        return "missing image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt image"
    if min(size) < 1:
        return "corrupt image"
    return size


def probe_images(paths: Sequence[str | Path], verify: bool = True) -> list[tuple[int, int] | str]:
    """:func:`probe_image` over many files, in threads (decoding releases the GIL).

    Parameters
    ----------
    paths : sequence of str or Path
        Image files.
    verify : bool
        If False only the header is read (fast, but a truncated file goes unnoticed).

    Returns
    -------
    list
        One result of :func:`probe_image` per path, in order.
    """
    probe = probe_image if verify else _probe_header
    workers = min(8, (os.cpu_count() or 1) * 2)
    if len(paths) < 16:
        return [probe(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe, paths, chunksize=32))


def pillow_open():
    """Pillow's own ``Image.open``, even after Ultralytics has wrapped it.

    Ultralytics replaces ``PIL.Image.open`` with a wrapper that, on a file Pillow cannot
    identify, tries to install ``pi-heif`` (a network call). For a reader an unidentifiable file
    is simply a corrupt image, so the original function is used.
    """
    from PIL import Image

    opener = Image.open
    module = getattr(opener, "__module__", "PIL.Image")
    if module != "PIL.Image":
        opener = getattr(sys.modules.get(module), "_image_open", opener)
    return opener


def _probe_header(path: str | Path) -> tuple[int, int] | str:
    try:
        with pillow_open()(path) as image:
            return image.size
    except FileNotFoundError:
        return "missing image"
    except (OSError, SyntaxError, ValueError):
        return "corrupt image"
