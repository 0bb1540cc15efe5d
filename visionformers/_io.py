"""Atomic file writes: a temporary file in the target's directory, fsync, then one rename.

A reader (another process, a resumed run) sees the old file or the new one, never a half-written one. The
lowest-level module of the package: it imports nothing from visionformers, so any module may use it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "file_mode", "fsync_file", "sha256_file"]


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the process umask (``mkstemp``
    creates 0o600 files, which a team sharing a model directory cannot read)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk (before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Publish the file that ``write(tmp_path)`` writes at ``path``: a temporary file in the same directory, the
    umask's mode (as ``open`` would give it), fsync, then an atomic rename. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def sha256_file(*paths: str | os.PathLike) -> str:
    """SHA-256 over the bytes of ``paths`` in order, read a MiB at a time (checkpoint and cache checksums, the
    fingerprint of a feature extractor's weights)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
