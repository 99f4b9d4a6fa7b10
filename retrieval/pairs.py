"""Paired prompt/image sets for reports and evaluation, paired by id, never by list order.

Accepted forms:
- a CSV or JSONL file with an image column (`image` or `file`) and a text column (`prompt`
  or `caption`); image paths are relative to `images_dir` when given, else to the file;
- a text file with one prompt a line plus an image folder whose file names start with the
  prompt's 0-based line number (`12.png`, `00012_3.png` for the 4th sample of prompt 12).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from indexing.readers import read_jsonl_rows

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_LEADING_INT = re.compile(r"^(\d+)(?:[_\-.].*)?$")


@dataclass(frozen=True)
class PairedSet:
    prompts: list[str]
    images: list[Path]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return list(read_jsonl_rows(path))
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pick(row: dict, names: tuple[str, ...]) -> str:
    for name in names:
        value = row.get(name)
        if value not in (None, ""):
            return str(value).strip()
    return ""


def load_pairs(prompts: str | Path, images_dir: str | Path | None = None, *, min_pairs: int = 2) -> PairedSet:
    """Read a paired set (see the module docstring); every failure names the file and line."""
    prompts = Path(prompts)
    if not prompts.is_file():
        raise ValueError(f"prompts file not found: {prompts}")
    images_dir = Path(images_dir) if images_dir is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise ValueError(f"image folder not found: {images_dir}")
    texts: list[str] = []
    paths: list[Path] = []
    if prompts.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        base = images_dir or prompts.parent
        for line, row in enumerate(_rows(prompts), start=2):
            image = _pick(row, ("image", "file", "path"))
            text = _pick(row, ("prompt", "caption", "text"))
            if not image or not text:
                raise ValueError(f"{prompts}, row {line - 1}: needs an image (image/file) and a prompt (prompt/caption)")
            path = Path(image) if Path(image).is_absolute() else base / image
            if not path.is_file():
                raise ValueError(f"{prompts}, row {line - 1}: image not found: {path}")
            texts.append(text)
            paths.append(path)
    else:
        if images_dir is None:
            raise ValueError("a plain prompts file needs an image folder whose file names start with the prompt's line number")
        lines = [ln.strip() for ln in prompts.read_text(encoding="utf-8").splitlines()]
        files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        unmatched = []
        for path in files:
            m = _LEADING_INT.match(path.stem)
            if m is None:
                unmatched.append(path.name)
                continue
            idx = int(m.group(1))
            if idx >= len(lines) or not lines[idx]:
                raise ValueError(f"image {path.name} refers to prompt line {idx}, but {prompts} has no prompt there")
            texts.append(lines[idx])
            paths.append(path)
        if unmatched:
            raise ValueError(
                f"{len(unmatched)} image(s) in {images_dir} do not start with a prompt line number "
                f"(e.g. {unmatched[0]!r}); name them <line>.png or <line>_<sample>.png"
            )
    if len(texts) < min_pairs:
        raise ValueError(f"{prompts}: {len(texts)} prompt/image pair(s) found, at least {min_pairs} needed")
    return PairedSet(prompts=texts, images=paths, source=str(prompts))
