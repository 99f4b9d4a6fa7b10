"""Readers: turn a source (folder, CSV, JSONL or parquet list) into :class:`SourceRecord`s.

The first stage of the indexing pipeline. A reader only lists what to index; it never opens
images, so a missing or broken file becomes a rejected record later, not a reader error.
A table needs a column naming the image file (one of ``PATH_COLUMNS``); a ``caption`` (or
``text``) column becomes the item's caption and every other column goes to its metadata.
Relative paths are resolved against ``image_root``, by default the table file's folder.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Images with more pixels than this are rejected as decompression bombs before decoding
#: (here, a module with no heavy imports, so the CLI and the UI can share it cheaply).
DEFAULT_MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif", ".ppm"}
)
PATH_COLUMNS = ("file", "path", "image", "image_path", "filepath", "filename", "uri")
CAPTION_COLUMNS = ("caption", "text")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class SourceRecord:
    """One image to index: its URI (absolute path), caption and extra metadata.

    ``path`` is None when a table row names no file; the pipeline rejects such a row.
    """

    uri: str
    path: Path | None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def file_uri(path: str | Path) -> str:
    """The catalog URI of a local file: its absolute, normalised path (symlinks kept)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def read_folder(
    root: str | Path, extensions: frozenset[str] = IMAGE_EXTENSIONS
) -> Iterator[SourceRecord]:
    """Every file under ``root`` (recursively, sorted) whose extension names an image."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    skipped = 0
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() not in extensions:
                skipped += 1
                continue
            path = Path(directory) / name
            yield SourceRecord(uri=file_uri(path), path=path)
    if skipped:
        logger.info("%s: ignored %d files without an image extension", root, skipped)


def records_from_rows(
    rows: Iterable[dict[str, Any]], image_root: str | Path, source_name: str
) -> Iterator[SourceRecord]:
    """Records from table rows (dicts); shared by the CSV, JSONL and parquet readers."""
    image_root = Path(image_root)
    path_column: str | None = None
    caption_column: str | None = None
    for number, row in enumerate(rows, start=1):
        if path_column is None:
            path_column = _pick_column(row, PATH_COLUMNS)
            if path_column is None:
                raise ValueError(
                    f"{source_name}: no image path column; expected one of "
                    f"{', '.join(PATH_COLUMNS)}, found {', '.join(map(str, row)) or 'none'}"
                )
            caption_column = _pick_column(row, CAPTION_COLUMNS)
        value = row.get(path_column)
        caption = _clean(row.get(caption_column)) if caption_column else None
        metadata = {
            str(key): _clean(item)
            for key, item in row.items()
            if key not in (path_column, caption_column)
        }
        if value is None or str(value).strip() == "":
            # Keep the row visible as a rejected record rather than dropping it silently.
            yield SourceRecord(
                uri=f"{source_name}#row={number}", path=None, caption=caption, metadata=metadata
            )
            continue
        path = Path(str(value).strip()).expanduser()
        if not path.is_absolute():
            path = image_root / path
        yield SourceRecord(uri=file_uri(path), path=path, caption=caption, metadata=metadata)


def read_csv(path: str | Path, image_root: str | Path | None = None) -> Iterator[SourceRecord]:
    """Rows of a CSV (or TSV, by extension) file with a header line."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.DictReader(handle, delimiter=delimiter)
        yield from records_from_rows(rows, image_root or path.parent, str(path))


def read_jsonl_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped); errors name the line."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            yield row


def read_jsonl(path: str | Path, image_root: str | Path | None = None) -> Iterator[SourceRecord]:
    """One JSON object per line; blank lines are skipped."""
    path = Path(path)
    yield from records_from_rows(read_jsonl_rows(path), image_root or path.parent, str(path))


def read_parquet(
    path: str | Path, image_root: str | Path | None = None, batch_rows: int = 65536
) -> Iterator[SourceRecord]:
    """Rows of a parquet file, read in record batches (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading parquet files needs pyarrow: pip install pyarrow") from error
    path = Path(path)
    parquet_file = pq.ParquetFile(path)

    def rows() -> Iterator[dict[str, Any]]:
        for batch in parquet_file.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()

    yield from records_from_rows(rows(), image_root or path.parent, str(path))


def read_source(
    source: str | Path, image_root: str | Path | None = None
) -> Iterator[SourceRecord]:
    """Dispatch on the source: a folder, or a .csv/.tsv/.jsonl/.ndjson/.parquet/.pq file."""
    source = Path(source)
    if source.is_dir():
        if image_root is not None:
            raise ValueError("image_root applies to table sources, not to a folder")
        return read_folder(source)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    kind = TABLE_SUFFIXES.get(source.suffix.lower())
    if kind == "csv":
        return read_csv(source, image_root)
    if kind == "jsonl":
        return read_jsonl(source, image_root)
    if kind == "parquet":
        return read_parquet(source, image_root)
    raise ValueError(
        f"cannot read {source}: expected a folder or a file ending in "
        f"{', '.join(sorted(TABLE_SUFFIXES))}"
    )


def _pick_column(row: dict[str, Any], candidates: tuple[str, ...]) -> str | None:
    by_lower = {str(key).lower(): key for key in row}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def _clean(value: Any) -> Any:
    """A JSON-friendly value: '' and NaN become None, other non-JSON types become text."""
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
