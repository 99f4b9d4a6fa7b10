"""Saved correctors: one ``.npz`` file (no pickle) holding a JSON ``meta`` entry and arrays.

``meta["format"]`` names the class that wrote the file, so :func:`load_corrector` reads any
of them; :func:`write_npz` writes atomically (a temporary file in the same folder, fsynced,
then renamed), so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError


def write_npz(path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """``meta`` (JSON) and ``arrays`` as one npz file at ``path``, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_npz(path, what: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a file written by :func:`write_npz`; an InputError saying it is not ``what``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not a saved {what}: {exc}") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, json.JSONDecodeError):
        raise InputError(f"{path} is not a saved {what} (no metadata)") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path} is not a saved {what} (its metadata is not an object)")
    return meta, arrays


def check_format(path, meta: dict[str, Any], file_format: str, version: int, what: str) -> None:
    if meta.get("format") != file_format:
        raise InputError(f"{path} is not a saved {what} (format {meta.get('format')!r})")
    if meta.get("version") != version:
        raise InputError(
            f"{path} was saved by another version of sce_correct (file version {meta.get('version')!r}, "
            f"this version reads {version}); fit the correction again"
        )


def load_corrector(path):
    """The corrector saved at ``path``: a :class:`SchurCorrector` or a :class:`HeadAblation`."""
    from .corrector import FILE_FORMAT as SCHUR_FORMAT, SchurCorrector
    from .heads import FILE_FORMAT as HEADS_FORMAT, HeadAblation

    meta, _ = read_npz(path, "correction")
    kinds = {SCHUR_FORMAT: SchurCorrector, HEADS_FORMAT: HeadAblation}
    cls = kinds.get(meta.get("format"))
    if cls is None:
        raise InputError(f"{path} is not a saved correction (format {meta.get('format')!r}; "
                         f"known: {', '.join(kinds)})")
    return cls.load(path)
