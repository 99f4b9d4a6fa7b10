"""Paired prompt/image sets for reports and evaluation.

Accepted forms:
- a table (CSV, JSONL or parquet, read by :mod:`indexing.tables` with its column
  convention): each row pairs its image (``image``/``file``/``path``...) with its prompt
  (``caption``/``prompt``/``text``); image paths are relative to ``images_dir`` when given,
  else to the table's folder;
- a text file with one prompt a line plus an image folder, paired in one of two ways:

  - ``pair_by="number"`` (the default): each image's file name starts with the number of its
    prompt's line, **counted from 0** (the first line is prompt 0: ``0.png``, ``00012_3.png``
    for the 4th sample of the 13th line), so pairs never depend on the order of a listing;
  - ``pair_by="order"`` (the reference code's convention): the prompts file's lines, in order,
    against the folder's image files sorted by name as text (``10.png`` sorts before ``2.png``);
    the counts must be equal.

Messages that name a place in a file name its line counted from 1, as editors do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from indexing.readers import list_image_files
from indexing.tables import pick_columns, read_table, read_text_lines, require_file, require_folder, table_kind, where
from sce_correct.errors import InputError

PAIR_BY = ("number", "order")
_LEADING_INT = re.compile(r"^(\d+)(?:[_\-.].*)?$")


@dataclass(frozen=True)
class PairedSet:
    prompts: list[str]
    images: list[Path]
    source: str
    pairing: str = ""  # how the pairs were made, for messages: "by table row", "by line number ..."

    def __len__(self) -> int:
        return len(self.prompts)


def _table_pairs(table_path: Path, base: Path) -> tuple[list[str], list[Path]]:
    texts: list[str] = []
    paths: list[Path] = []
    for row in read_table(table_path).rows():
        columns = pick_columns(row.values)
        image = str(row.values.get(columns.path) or "").strip() if columns.path else ""
        text = str(row.values.get(columns.text) or "").strip() if columns.text else ""
        if not image or not text:
            raise InputError(f"{row.where}: needs an image (image/file/path) and a prompt (caption/prompt/text)")
        path = Path(image) if Path(image).is_absolute() else base / image
        if not path.is_file():
            raise InputError(f"{row.where}: image not found: {path}")
        texts.append(text)
        paths.append(path)
    return texts, paths


def _pairs_by_number(prompts: Path, lines: list[str], images_dir: Path) -> tuple[list[str], list[Path]]:
    texts: list[str] = []
    paths: list[Path] = []
    unmatched = []
    for path in list_image_files(images_dir, recursive=False):
        m = _LEADING_INT.match(path.stem)
        if m is None:
            unmatched.append(path.name)
            continue
        idx = int(m.group(1))
        if idx >= len(lines) or not lines[idx]:
            state = (f"that line ({where(prompts, idx + 1)} as an editor counts) is blank" if idx < len(lines)
                     else f"{prompts} has {len(lines)} line(s), 0 to {len(lines) - 1}")
            raise InputError(f"image {path.name} refers to prompt line {idx} (counted from 0), but {state}: "
                             "no prompt there")
        texts.append(lines[idx])
        paths.append(path)
    if unmatched:
        raise InputError(
            f"{len(unmatched)} image(s) in {images_dir} do not start with a prompt line number "
            f"(e.g. {unmatched[0]!r}); name them <line>.png or <line>_<sample>.png with lines counted from 0, "
            "or pair by sorted order with --pair-by order"
        )
    return texts, paths


def _pairs_by_order(prompts: Path, lines: list[str], images_dir: Path) -> tuple[list[str], list[Path]]:
    while lines and not lines[-1]:  # trailing blank lines end the file, they are not prompts
        lines = lines[:-1]
    files = list_image_files(images_dir, recursive=False)
    if len(lines) != len(files):
        raise InputError(f"--pair-by order pairs the prompts file's lines with the images in sorted order, but "
                         f"{prompts} has {len(lines)} prompt line(s) and {images_dir} {len(files)} image(s)")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise InputError(f"{where(prompts, number)}: blank, but with --pair-by order every line is the prompt "
                             f"of one image (here {files[number - 1].name})")
    return list(lines), files


def load_pairs(prompts: str | Path, images_dir: str | Path | None = None, *, min_pairs: int = 2,
               pair_by: str = "number") -> PairedSet:
    """Read a paired set (see the module docstring); every failure names the file and line."""
    prompts = Path(prompts)
    if pair_by not in PAIR_BY:
        raise InputError(f"--pair-by takes {' or '.join(PAIR_BY)}, not {pair_by!r}")
    require_file(prompts, "prompts file")
    images_dir = Path(images_dir) if images_dir is not None else None
    if images_dir is not None:
        require_folder(images_dir, "image folder")
    if table_kind(prompts) is not None:
        if pair_by != "number":
            raise InputError(f"--pair-by {pair_by} applies to a plain prompts file; each row of the table "
                             f"{prompts.name} names its own image")
        texts, paths = _table_pairs(prompts, images_dir or prompts.parent)
        pairing = f"by table row ({prompts.name})"
    else:
        if images_dir is None:
            raise InputError("a plain prompts file needs an image folder whose file names start with the prompt's "
                             "line number counted from 0 (or --pair-by order to pair lines with sorted file names)")
        lines = read_text_lines(prompts)
        pair = _pairs_by_number if pair_by == "number" else _pairs_by_order
        texts, paths = pair(prompts, lines, images_dir)
        pairing = (f"by the line number that starts each image's name, counted from 0 (0.png is line 1 of "
                   f"{prompts.name})" if pair_by == "number" else
                   f"in order: line 1 of {prompts.name} with the first image of {images_dir.name} sorted by name")
    if len(texts) < min_pairs:
        raise InputError(f"{prompts}: {len(texts)} prompt/image pair(s) found, at least {min_pairs} needed")
    return PairedSet(prompts=texts, images=paths, source=str(prompts), pairing=pairing)
