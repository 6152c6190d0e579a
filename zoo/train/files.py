"""Durable file writes: one helper for every file a run writes in place of an older one.

    atomic_write(path, data)    # bytes or str: the old file, or the new one, never a mix

The data goes to a temporary file beside `path`, which is flushed and fsynced, renamed over
`path` with `os.replace` (atomic on POSIX), and then the folder itself is fsynced so that the
rename survives a power cut. A crash at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: str | Path, data: bytes) -> None:
    """Write `data` to a new file at `path` and fsync it (no rename: for files in a temporary folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so that the renames and new entries in it are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` atomically and durably (str is written as UTF-8)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_synced(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
