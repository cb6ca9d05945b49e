"""Durable file replacement: a reader sees the old file or the new one, never a torn one.

``os.replace`` alone survives a killed process, not a power loss: the new file's data and the
rename itself may still sit in the page cache. The temporary file is fsynced before the rename
and its folder after it, so both are on disk when the call returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace ``path`` durably with what ``write(tmp)`` writes to a temporary file beside it.

    Parameters
    ----------
    path : str or PathLike
        The file to create or replace.
    write : callable
        Writes the complete new content to the path it is given (e.g. ``torch.save(obj, tmp)``).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
