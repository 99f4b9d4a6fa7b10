"""Files that reach the web UI from a browser: checked images and staged prompt/image sets.

An upload arrives as a temporary file with its own random folder. The UI never trusts the
paths written inside an uploaded table: :func:`stage_pairs` copies the uploaded images into
one folder and rewrites the table so that every image is one of them (matched by file
name). A table that names an image that was not uploaded is an error naming its line, so a
remote user cannot make the server read (or show) a file of its choosing.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from indexing.images import DEFAULT_MAX_PIXELS, check_image
from indexing.tables import PATH_COLUMNS, read_table, read_text_lines, table_kind
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

#: Uploaded tables: those indexing.tables reads as text (CSV/TSV, JSONL), and plain prompt lists.
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".txt")

__all__ = ["DEFAULT_MAX_PIXELS", "check_image", "stage_images", "stage_pairs", "stage_reference"]


def stage_images(image_files: Sequence[str | Path], into: Path, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Path]:
    """Copy checked uploaded images into ``into``; returns file name -> staged path."""
    into.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    for file in image_files:
        source = Path(file)
        name = source.name
        if name in staged:
            raise InputError(f"two uploaded images are both named {name!r}; rename one of them")
        check_image(source, max_pixels=max_pixels, label=name)
        target = into / name
        shutil.copyfile(source, target)
        staged[name] = target
    return staged


def _staged_image(value: str, staged: dict[str, Path], where: str) -> str:
    name = Path(value.replace("\\", "/")).name
    if name not in staged:
        listed = ", ".join(sorted(staged)[:5]) + (" ..." if len(staged) > 5 else "")
        raise InputError(
            f"{where}: image {value!r} is not among the uploaded images"
            + (f" ({listed})" if staged else " (no images were uploaded)")
            + "; upload it too (images are matched by file name)"
        )
    return f"images/{name}"


def stage_pairs(table_file: str | Path, image_files: Sequence[str | Path], into: Path, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Path, Path]:
    """Stage an uploaded prompt table and its images in ``into``: returns (table, image folder).

    CSV/TSV and JSONL tables (read by indexing.tables) have every column that can name an
    image (indexing.tables.PATH_COLUMNS) rewritten to the staged copies; a plain
    text file (one prompt a line) is copied as it is, its images keep their names (which
    start with the prompt's line number, see retrieval.pairs).
    """
    table = Path(table_file)
    suffix = table.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        kind = suffix or "a file without extension"
        raise InputError(f"{table.name}: upload a .csv, .tsv, .jsonl or .txt prompts file, not {kind}")
    images_dir = into / "images"
    staged = stage_images(image_files, images_dir, max_pixels=max_pixels)
    target = into / table.name
    if table_kind(table) is None:  # a plain prompts file: checked as UTF-8 text, copied as it is
        read_text_lines(table)
        shutil.copyfile(table, target)
    else:
        _stage_table(table, target, staged)
    logger.info("staged %s with %d uploaded images in %s", table.name, len(staged), into)
    return target, images_dir


def _stage_table(table: Path, target: Path, staged: dict[str, Path]) -> None:
    """Copy a CSV/TSV/JSONL table to ``target`` with every image column (any of the one column
    convention's PATH_COLUMNS, in every row) pointing at the staged uploads."""
    rows = []
    try:  # messages name the upload by its own name, not the server's temporary path
        read = read_table(table)
        for row in read.rows():
            values = dict(row.values)
            # Every column that could name an image (whichever one a reader picks) is rewritten.
            for column in [key for key in values if str(key).strip().lower() in PATH_COLUMNS]:
                value = values[column]
                if isinstance(value, str) and value.strip():
                    values[column] = _staged_image(value.strip(), staged, row.where)
                elif not (value is None or isinstance(value, str)):
                    raise InputError(f"{row.where}: {column} must name an image file, not {value!r}")
            rows.append(values)
    except InputError as error:
        raise InputError(str(error).replace(str(table), table.name)) from None
    if read.kind == "csv":
        delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=read.columns, delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    else:
        target.write_text("".join(json.dumps(values) + "\n" for values in rows), encoding="utf-8")


def stage_reference(image_files: Sequence[str | Path], into: Path, *, min_images: int = 2,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Stage uploaded reference images (checked, by file name) in ``into``; returns the folder.

    A reference set needs at least ``min_images`` images (a covariance of one image is
    meaningless), else InputError.
    """
    files = list(image_files)
    if len(files) < min_images:
        raise InputError(f"{len(files)} reference image(s) uploaded; a reference set needs at least {min_images} "
                         "(or upload none to skip the reference metrics)")
    stage_images(files, into, max_pixels=max_pixels)
    logger.info("staged %d uploaded reference images in %s", len(files), into)
    return into
