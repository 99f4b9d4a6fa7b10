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

from indexing.readers import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

#: Image decoders that PIL must recognise for an upload to count as an image.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".txt")
#: Columns that may hold an image path (retrieval.pairs and retrieval.concepts read these).
IMAGE_COLUMNS = ("image", "file", "path")


def check_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, label: str | None = None) -> Path:
    """Return ``path`` when it is a readable image of at most ``max_pixels``; else ValueError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    name = label or path.name
    try:
        with Image.open(path) as image:
            width, height = image.size
            kind = image.format
            if kind not in IMAGE_FORMATS:
                raise ValueError(f"{name} is a {kind} file; upload a PNG, JPEG, WebP, BMP, GIF or TIFF image")
            if width * height > max_pixels:
                raise ValueError(
                    f"{name} is {width}x{height} pixels, more than the {max_pixels:,} this server accepts"
                )
            image.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} is not an image this server can read ({error.__class__.__name__})") from None
    except OSError as error:
        raise ValueError(f"{name} is not a readable image: {error}") from None
    return path


def stage_images(image_files: Sequence[str | Path], into: Path, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Path]:
    """Copy checked uploaded images into ``into``; returns file name -> staged path."""
    into.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    for file in image_files:
        source = Path(file)
        name = source.name
        if name in staged:
            raise ValueError(f"two uploaded images are both named {name!r}; rename one of them")
        check_image(source, max_pixels=max_pixels, label=name)
        target = into / name
        shutil.copyfile(source, target)
        staged[name] = target
    return staged


def _staged_image(value: str, staged: dict[str, Path], where: str) -> str:
    name = Path(value.replace("\\", "/")).name
    if name not in staged:
        listed = ", ".join(sorted(staged)[:5]) + (" ..." if len(staged) > 5 else "")
        raise ValueError(
            f"{where}: image {value!r} is not among the uploaded images"
            + (f" ({listed})" if staged else " (no images were uploaded)")
            + "; upload it too (images are matched by file name)"
        )
    return f"images/{name}"


def stage_pairs(table_file: str | Path, image_files: Sequence[str | Path], into: Path, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Path, Path]:
    """Stage an uploaded prompt table and its images in ``into``: returns (table, image folder).

    CSV and JSONL tables have their image column rewritten to the staged copies; a plain
    text file (one prompt a line) is copied as it is, its images keep their names (which
    start with the prompt's line number, see retrieval.pairs).
    """
    table = Path(table_file)
    suffix = table.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        kind = suffix or "a file without extension"
        raise ValueError(f"{table.name}: upload a .csv, .jsonl or .txt prompts file, not {kind}")
    images_dir = into / "images"
    staged = stage_images(image_files, images_dir, max_pixels=max_pixels)
    target = into / table.name
    try:
        if suffix == ".csv":
            with table.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                columns = list(reader.fieldnames or [])
                rows = list(reader)
            image_columns = [c for c in columns if (c or "").strip() in IMAGE_COLUMNS]
            for line, row in enumerate(rows, start=2):
                for column in image_columns:
                    if (row.get(column) or "").strip():
                        row[column] = _staged_image(row[column].strip(), staged, f"{table.name}, line {line}")
            with target.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        elif suffix in (".jsonl", ".ndjson"):
            lines = []
            for line, text in enumerate(table.read_text(encoding="utf-8").splitlines(), start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{table.name}, line {line}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{table.name}, line {line}: expected a JSON object")
                for column in IMAGE_COLUMNS:
                    if isinstance(row.get(column), str) and row[column].strip():
                        row[column] = _staged_image(row[column].strip(), staged, f"{table.name}, line {line}")
                lines.append(json.dumps(row))
            target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            target.write_text(table.read_text(encoding="utf-8"), encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{table.name} is not a UTF-8 text file") from None
    except csv.Error as error:
        raise ValueError(f"{table.name} is not a readable CSV file: {error}") from None
    logger.info("staged %s with %d uploaded images in %s", table.name, len(staged), into)
    return target, images_dir


def stage_reference(image_files: Sequence[str | Path], into: Path, *, min_images: int = 2,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Stage uploaded reference images (checked, by file name) in ``into``; returns the folder.

    A reference set needs at least ``min_images`` images (a covariance of one image is
    meaningless), else ValueError.
    """
    files = list(image_files)
    if len(files) < min_images:
        raise ValueError(f"{len(files)} reference image(s) uploaded; a reference set needs at least {min_images} "
                         "(or upload none to skip the reference metrics)")
    stage_images(files, into, max_pixels=max_pixels)
    logger.info("staged %d uploaded reference images in %s", len(files), into)
    return into
