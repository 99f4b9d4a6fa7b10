"""Preliminary concept sets: CSV files of (prompt, image) pairs that define a concept.

The prompts should vary in the concept and in nothing else ("light skin tone", "dark skin
tone", ...); each is paired with an image that shows that value of the concept. Image paths
are relative to the CSV's folder (absolute paths work too). For text-to-text corrections a
file with columns (source, target) pairs two texts instead.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

MIN_PAIRS = 4


@dataclass(frozen=True)
class ConceptSet:
    """Paired preliminary data; `images` holds paths for image pairs, `targets` texts for t2t."""

    name: str
    source: Path
    prompts: list[str]
    images: list[Path] | None = None
    targets: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise ValueError(f"concept file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = [c.strip() for c in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} is not a readable CSV file: {exc}") from None
    return columns, [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


def _check_size(name: str, prompts: list[str]) -> None:
    if len(prompts) < MIN_PAIRS:
        raise ValueError(f"concept set {name!r} has {len(prompts)} pair(s); at least {MIN_PAIRS} are needed")
    if len(set(prompts)) < 2:
        raise ValueError(
            f"concept set {name!r} has a single distinct prompt ({prompts[0]!r}); the prompts must vary "
            "in the concept (e.g. 'light skin tone', 'dark skin tone')"
        )


def load_concept_set(path: str | Path) -> ConceptSet:
    """Read and check a concept CSV: columns prompt,image (or source,target for text pairs).

    Every row must pair a non-empty prompt with an existing image (or a non-empty target
    text); a row that does not is an error naming its line, and nothing is fitted.
    """
    path = Path(path)
    columns, rows = _read_rows(path)
    name = path.stem
    if {"prompt", "image"} <= set(columns):
        prompts, images = [], []
        for line, row in enumerate(rows, start=2):
            prompt, image = row.get("prompt", ""), row.get("image", "")
            if not prompt or not image:
                missing = "prompt" if not prompt else "image"
                raise ValueError(f"{path}, line {line}: the {missing} is empty, so prompts and images don't pair up")
            image_path = Path(image) if Path(image).is_absolute() else (path.parent / image)
            if not image_path.is_file():
                raise ValueError(f"{path}, line {line}: image not found: {image_path}")
            prompts.append(prompt)
            images.append(image_path.resolve())
        _check_size(name, prompts)
        return ConceptSet(name=name, source=path, prompts=prompts, images=images)
    if {"source", "target"} <= set(columns):
        sources, targets = [], []
        for line, row in enumerate(rows, start=2):
            if not row.get("source") or not row.get("target"):
                raise ValueError(f"{path}, line {line}: source or target text is empty, so the texts don't pair up")
            sources.append(row["source"])
            targets.append(row["target"])
        _check_size(name, sources)
        return ConceptSet(name=name, source=path, prompts=sources, targets=targets)
    raise ValueError(
        f"{path} has columns {columns}; a concept file needs 'prompt,image' (or 'source,target' for text pairs)"
    )


def text_pairs(sources: list[str], targets: list[str], name: str = "texts") -> ConceptSet:
    """A text-to-text concept set from two equally long lists."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} source texts but {len(targets)} target texts: they must pair up")
    if any(not s.strip() for s in sources) or any(not t.strip() for t in targets):
        raise ValueError("source and target texts must not be empty")
    _check_size(name, list(sources))
    return ConceptSet(name=name, source=Path("."), prompts=list(sources), targets=list(targets))


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file (one prompt or caption a line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
