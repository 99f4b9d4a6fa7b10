"""Atomic file writes: write a temporary file, fsync it, rename it into place.

Kept apart from the FAISS code so that report and evaluation writers use the same mechanism
without importing faiss. Also :func:`file_sha256`, the content hash of a file.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from sce_correct.errors import InputError


def temporary_name(path: str | Path) -> Path:
    """A hidden, unique sibling of ``path`` to write before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def check_output_folder(folder: str | Path, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be one: "WHAT F is a file, not a
    folder", or "WHAT F/x: F is a file, not a folder" when a part of its path is a file."""
    folder = Path(folder).expanduser().absolute()
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == folder else f"{folder}: "
                raise InputError(f"{what} {where}{part} is a file, not a folder")
            return


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary_path)``, then fsync and rename it into place.

    A failure at any point leaves the previous file untouched and removes the temporary one,
    so a reader (or a process killed mid-write) only ever sees a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        write(temporary)
        replace_durably(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_durably(temporary: str | Path, path: str | Path) -> None:
    """fsync the complete file ``temporary``, rename it to ``path`` and fsync the directory."""
    fsync_file(temporary)
    os.replace(temporary, path)
    fsync_directory(Path(path).parent)


def fsync_file(path: str | Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(directory: str | Path) -> None:
    """Make renames and new names in ``directory`` durable (harmless where unsupported)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read block-wise): the content hash stored per item."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
