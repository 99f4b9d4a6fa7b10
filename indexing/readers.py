"""Readers: turn a source (folder, CSV, JSONL or parquet list) into :class:`SourceRecord`s.

The first stage of the indexing pipeline. A reader only lists what to index; it never opens
images, so a missing or broken file becomes a rejected record later, not a reader error.
Tables are read by :mod:`indexing.tables` with its column convention: the image path is the
first of ``PATH_COLUMNS`` (``image``, ``file``, ``path``, ...), the caption the first of
``TEXT_COLUMNS`` (``caption``, ``prompt``, ``text``), every other column is metadata.
Relative paths are resolved against ``image_root``, by default the table file's folder.
A folder is listed recursively by :func:`walk_image_files` with the one list of image
suffixes (:data:`indexing.images.IMAGE_SUFFIXES`); a subfolder that cannot be read becomes a
record carrying the error, so the pipeline records it as a failure instead of skipping it.
A listing that lists nothing is an :class:`~sce_correct.errors.InputError` saying so.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexing.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, is_image_name
from indexing.tables import (
    PATH_COLUMNS,
    TABLE_SUFFIXES,
    TEXT_COLUMNS,
    Columns,
    Row,
    no_path_column,
    pick_columns,
    read_table,
    require_folder,
)
from sce_correct.errors import InputError, NotFoundError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "PATH_COLUMNS", "TEXT_COLUMNS", "TABLE_SUFFIXES",
           "SourceRecord", "file_uri", "walk_image_files", "list_image_files", "read_folder", "read_table_source",
           "read_source", "metadata_value"]


@dataclass(frozen=True)
class SourceRecord:
    """One image to index: its URI (absolute path), caption and extra metadata.

    ``path`` is None when a table row names no file; ``error`` says why a listed path (a
    folder that cannot be read) cannot be indexed. The pipeline rejects both.
    """

    uri: str
    path: Path | None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def file_uri(path: str | Path) -> str:
    """The catalog URI of a local file: its absolute, normalised path (symlinks kept)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


# -- folders -----------------------------------------------------------------------------------
def walk_image_files(root: str | Path, *, recursive: bool = True) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each image file under ``root``, sorted; (folder, why) for a folder that
    cannot be read. ``root`` itself must be a readable folder (else InputError/NotFoundError)."""
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder")
    errors: list[OSError] = []
    skipped = 0

    def unreadable() -> Iterator[tuple[Path, str]]:
        for error in errors:
            folder = Path(error.filename) if error.filename else root
            if folder == root:
                raise InputError(f"cannot read the folder {root}: {error.strerror or error}")
            yield folder, f"folder cannot be read: {error.strerror or error}"
        errors.clear()

    for directory, subdirectories, files in os.walk(root, onerror=errors.append):
        yield from unreadable()
        if recursive:
            subdirectories.sort()
        else:
            subdirectories.clear()
        for name in sorted(files):
            if is_image_name(name):
                yield Path(directory) / name, None
            else:
                skipped += 1
    yield from unreadable()
    if skipped:
        logger.info("%s: ignored %d files without an image suffix", root, skipped)


def list_image_files(folder: str | Path, *, recursive: bool = True, what: str = "image folder") -> list[Path]:
    """The image files of ``folder`` (sorted); a subfolder that cannot be read is an InputError."""
    files = []
    for path, error in walk_image_files(folder, recursive=recursive):
        if error is not None:
            raise InputError(f"{what} {folder}: {path} {error.removeprefix('folder ')}")
        files.append(path)
    return files


def read_folder(root: str | Path) -> Iterator[SourceRecord]:
    """Every image file under ``root`` (recursively, sorted), and each folder that cannot be read."""
    listed = 0
    others = 0
    for path, error in walk_image_files(root):
        listed += 1
        yield SourceRecord(uri=file_uri(path), path=path, error=error)
    if not listed:
        others = sum(len(files) for _, _, files in os.walk(root))
        raise InputError(
            f"{root}: nothing listed: no image files (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
            + (f"; {others} other file(s) ignored" if others else "; the folder is empty")
        )


# -- tables ------------------------------------------------------------------------------------
def records_from_rows(
    rows: Iterable[Row], image_root: str | Path, source_name: str
) -> Iterator[SourceRecord]:
    """Records from table rows by the column convention of :mod:`indexing.tables`."""
    image_root = Path(image_root)
    convention: dict[tuple[str, ...], Columns] = {}
    for number, row in enumerate(rows, start=1):  # data rows, as in catalogs built before
        keys = tuple(row.values)
        columns = convention.get(keys) or convention.setdefault(keys, pick_columns(keys))
        if columns.path is None:
            raise no_path_column(row.where, keys)
        value = row.values.get(columns.path)
        caption = metadata_value(row.values.get(columns.text)) if columns.text else None
        metadata = {str(key): metadata_value(item) for key, item in columns.metadata(row.values).items()}
        if value is None or str(value).strip() == "":
            # Keep the row visible as a rejected record rather than dropping it silently.
            yield SourceRecord(uri=f"{source_name}#row={number}", path=None, caption=caption, metadata=metadata)
            continue
        path = Path(str(value).strip()).expanduser()
        if not path.is_absolute():
            path = image_root / path
        yield SourceRecord(uri=file_uri(path), path=path, caption=caption, metadata=metadata)


def read_table_source(path: str | Path, image_root: str | Path | None = None) -> Iterator[SourceRecord]:
    """The records of a CSV/TSV, JSONL or parquet listing; an empty listing is an InputError."""
    table = read_table(path)
    if table.columns is not None and pick_columns(table.columns).path is None:
        raise no_path_column(table.path, table.columns)
    return _listing(table, image_root)


def _listing(table, image_root: str | Path | None) -> Iterator[SourceRecord]:
    listed = 0
    for record in records_from_rows(table.rows(), image_root or table.path.parent, str(table.path)):
        listed += 1
        yield record
    if not listed:
        raise InputError(f"{table.path}: nothing listed: {table.empty}")


def read_source(
    source: str | Path, image_root: str | Path | None = None
) -> Iterator[SourceRecord]:
    """Dispatch on the source: a folder, or a .csv/.tsv/.jsonl/.ndjson/.parquet/.pq file."""
    source = Path(source)
    if source.is_dir():
        if image_root is not None:
            raise InputError("image_root applies to table sources, not to a folder")
        return read_folder(source)
    if not source.exists():
        raise NotFoundError(f"source {source} does not exist")
    if source.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(
            f"cannot read {source}: expected a folder or a file ending in {', '.join(sorted(TABLE_SUFFIXES))}"
        )
    if image_root is not None:  # checked even when every path in the table is absolute
        require_folder(Path(image_root), "image root")
    return read_table_source(source, image_root)


def metadata_value(value: Any) -> Any:
    """A JSON-friendly value: '' and NaN become None, other non-JSON types become text (how
    every reader of item metadata, and ``sce index import``, cleans a value)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, dict)):
        return json.loads(json.dumps(value, default=str))
    return str(value)
