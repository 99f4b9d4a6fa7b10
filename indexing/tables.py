"""The one table reader (CSV/TSV, JSONL, parquet) and the one column convention.

Collection listings, concept sets, prompt/image pair files and the web UI's uploaded tables
all read through :func:`read_table`, and name their columns the same way:

- the image path is the first of :data:`PATH_COLUMNS` the table has (``image``, ``file``,
  ``path``, ...; names are matched without regard to case);
- the caption or prompt is the first of :data:`TEXT_COLUMNS` (``caption``, ``prompt``, ``text``);
- every other column is metadata.

Every problem is an :class:`~sce_correct.errors.InputError` whose one line names the file and
the line (``captions.csv, line 7: ...``): bytes that are not UTF-8, a row with more or fewer
fields than the header, a line that is not a JSON object. Line numbers count from 1, as
editors do, and the header is line 1 of a CSV file.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sce_correct.errors import InputError, NotFoundError

PATH_COLUMNS = ("image", "file", "path", "image_path", "filepath", "filename", "uri")
TEXT_COLUMNS = ("caption", "prompt", "text")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}


def where(path: str | Path, line: int, unit: str = "line") -> str:
    """How a message names a place in a file: ``file, line N``."""
    return f"{path}, {unit} {line}"


@dataclass(frozen=True)
class Columns:
    """Which of a row's columns holds the image path and which the caption/prompt."""

    path: str | None
    text: str | None

    def metadata(self, values: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in values.items() if key not in (self.path, self.text)}


def pick_columns(names: Iterable[str]) -> Columns:
    """The column convention: the first of PATH_COLUMNS and of TEXT_COLUMNS among ``names``."""
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(str(name).strip().lower(), name)

    def first(candidates: tuple[str, ...]) -> str | None:
        return next((by_lower[c] for c in candidates if c in by_lower), None)

    return Columns(first(PATH_COLUMNS), first(TEXT_COLUMNS))


def no_path_column(source: str | Path, found: Iterable[str]) -> InputError:
    found = ", ".join(map(str, found)) or "none"
    return InputError(f"{source}: no image path column; expected one of {', '.join(PATH_COLUMNS)}, found {found}")


@dataclass(frozen=True)
class Row:
    """One row of a table: where it is (for messages), its line (parquet: row) number from 1,
    and its values by column name."""

    where: str
    number: int
    values: dict[str, Any]


@dataclass(frozen=True)
class Table:
    """A table file. ``columns`` is the header (None for JSONL, whose keys can vary by line)."""

    path: Path
    kind: str
    columns: list[str] | None

    def rows(self) -> Iterator[Row]:
        """The rows in file order; blank lines are skipped; problems raise InputError."""
        if self.kind == "csv":
            return _csv_rows(self.path)
        if self.kind == "jsonl":
            return _jsonl_rows(self.path)
        return _parquet_rows(self.path)

    @property
    def empty(self) -> str:
        """What an empty table of this kind is, for 'nothing listed' messages."""
        return {"csv": "it has a header line and no rows", "jsonl": "it has no JSON lines",
                "parquet": "it has no rows"}[self.kind]


def table_kind(path: str | Path) -> str | None:
    """'csv', 'jsonl' or 'parquet' by the file's suffix, else None."""
    return TABLE_SUFFIXES.get(Path(path).suffix.lower())


def read_table(path: str | Path) -> Table:
    """Open a table by its suffix (.csv/.tsv, .jsonl/.ndjson, .parquet/.pq) and read its header."""
    path = Path(path)
    kind = table_kind(path)
    if kind is None:
        raise InputError(f"cannot read {path}: expected a file ending in {', '.join(sorted(TABLE_SUFFIXES))}")
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if kind == "csv":
        columns = _csv_header(path)
    elif kind == "parquet":
        columns = list(_parquet_file(path).schema_arrow.names)
    else:
        columns = None
    return Table(path, kind, columns)


def utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text with its line ending) of a UTF-8 file; a BOM is dropped.

    Lines end at ``\n``, ``\r\n`` or a lone ``\r``, as in Python's universal newlines.

    Bytes that are not UTF-8 are an InputError naming the file, the line and the column.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    # \n, \r\n and a lone \r (old Mac exports) all end a line.
    pieces = (piece for chunk in handle for piece in chunk.splitlines(keepends=True))
    with handle:
        for number, raw in enumerate(pieces, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(
                    f"{where(path, number)}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            yield number, (text.removeprefix("\ufeff") if number == 1 else text)


def require_file(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a file: "WHAT not found: PATH", or, when something else is
    there, "WHAT PATH is a folder, not a file" (not "not found", which would send the user
    looking for a path that exists)."""
    if path.is_file():
        return
    if not path.exists():
        raise NotFoundError(f"{what} not found: {path}")
    raise InputError(f"{what} {path} is a folder, not a file" if path.is_dir() else f"{what} {path} is not a regular file")


def require_folder(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a folder: "WHAT not found: PATH" or "WHAT PATH is a file, not a folder"."""
    if path.is_dir():
        return
    if not path.exists():
        raise NotFoundError(f"{what} not found: {path}")
    raise InputError(f"{what} {path} is a file, not a folder")


def read_text_lines(path: str | Path) -> list[str]:
    """Every line of a UTF-8 text file, stripped (blank lines kept, so index i is line i + 1)."""
    path = Path(path)
    require_file(path, "text file")
    return [text.strip() for _, text in utf8_lines(path)]


# -- CSV ---------------------------------------------------------------------------------------
def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank CSV record (a quoted field may span lines)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = utf8_lines(path)
    # strict: a stray quote is an error, not a field that silently runs to the end of the file
    reader = csv.reader((text for _, text in lines), delimiter=delimiter, strict=True)
    start = 1
    try:
        for fields in reader:
            if fields:
                yield start, fields
            start = reader.line_num + 1
    except csv.Error as error:
        text = str(error)
        quoting = "'\"'" in text or "end of data" in text
        hint = "; a quoted field ends with a quote, and a quote inside it is doubled" if quoting else ""
        raise InputError(f"{where(path, start)}: not a readable CSV row ({text}){hint}") from None


def _csv_header(path: Path) -> list[str]:
    first = next(_csv_records(path), None)
    if first is None:
        raise InputError(f"{path} is empty: a CSV file needs a header line naming its columns")
    line, header = first
    header = [name.strip() for name in header]
    seen: set[str] = set()
    for name in header:
        if name.lower() in seen:
            raise InputError(f"{where(path, line)}: the header names the column {name!r} twice")
        seen.add(name.lower())
    return header


def _csv_rows(path: Path) -> Iterator[Row]:
    records = _csv_records(path)
    first = next(records, None)
    if first is None:  # emptied since read_table read the header
        return
    header = [name.strip() for name in first[1]]
    for line, fields in records:
        if len(fields) != len(header):
            more = "more" if len(fields) > len(header) else "fewer"
            raise InputError(
                f"{where(path, line)}: {len(fields)} fields, {more} than the {len(header)} columns of the header "
                f"({', '.join(header)}); quote a field that holds the delimiter"
            )
        yield Row(where(path, line), line, dict(zip(header, fields)))


# -- JSONL -------------------------------------------------------------------------------------
def _jsonl_rows(path: Path) -> Iterator[Row]:
    for number, text in utf8_lines(path):
        if not text.strip():
            continue
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{where(path, number)}: not valid JSON ({error.msg})") from None
        if not isinstance(values, dict):
            raise InputError(f"{where(path, number)}: expected a JSON object per line, got {type(values).__name__}")
        yield Row(where(path, number), number, values)


# -- parquet -----------------------------------------------------------------------------------
def _parquet_file(path: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise InputError(f"{path} is not a readable parquet file: {error}") from None


def _parquet_rows(path: Path, batch_rows: int = 65536) -> Iterator[Row]:
    import pyarrow

    number = 0
    try:
        for batch in _parquet_file(path).iter_batches(batch_size=batch_rows):
            for values in batch.to_pylist():
                number += 1
                yield Row(where(path, number, "row"), number, values)
    except (pyarrow.ArrowException, OSError) as error:
        raise InputError(f"{where(path, number + 1, 'row')}: cannot read the parquet data: {error}") from None


__all__ = ["PATH_COLUMNS", "TEXT_COLUMNS", "TABLE_SUFFIXES", "Columns", "Row", "Table", "pick_columns",
           "no_path_column", "read_table", "read_text_lines", "table_kind", "utf8_lines", "where"]
