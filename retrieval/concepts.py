"""Preliminary concept sets: tables of (prompt, image) pairs that define a concept.

The prompts should vary in the concept and in nothing else ("light skin tone", "dark skin
tone", ...); each is paired with an image that shows that value of the concept. A concept
file is a CSV, JSONL or parquet table read by :mod:`indexing.tables` with its column
convention (the image in ``image``/``file``/``path``..., the prompt in ``caption``/``prompt``/
``text``). Image paths are relative to the file's folder (absolute paths work too). For
text-to-text corrections a table with columns (source, target) pairs two texts instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from indexing.tables import Row, pick_columns, read_table, require_file
from indexing.tables import read_text_lines as _read_lines
from sce_correct.errors import InputError

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


def _read_rows(path: Path) -> tuple[list[str], list[Row]]:
    require_file(path, "concept file")
    table = read_table(path)
    rows = list(table.rows())
    columns = table.columns if table.columns is not None else list(rows[0].values) if rows else []
    return columns, [Row(row.where, row.number, {str(k).strip(): _text(v) for k, v in row.values.items()})
                     for row in rows]


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _check_size(name: str, prompts: list[str]) -> None:
    if len(prompts) < MIN_PAIRS:
        raise InputError(f"concept set {name!r} has {len(prompts)} pair(s); at least {MIN_PAIRS} are needed")
    if len(set(prompts)) < 2:
        raise InputError(
            f"concept set {name!r} has a single distinct prompt ({prompts[0]!r}); the prompts must vary "
            "in the concept (e.g. 'light skin tone', 'dark skin tone')"
        )


def load_concept_set(path: str | Path) -> ConceptSet:
    """Read and check a concept table: prompt,image columns (or source,target for text pairs).

    Every row must pair a non-empty prompt with an existing image (or a non-empty target
    text); a row that does not is an error naming its line, and nothing is fitted.
    """
    path = Path(path)
    columns, rows = _read_rows(path)
    name = path.stem
    convention = pick_columns(columns)
    if convention.path is not None and convention.text is not None:
        prompts, images = [], []
        for row in rows:
            prompt, image = row.values.get(convention.text, ""), row.values.get(convention.path, "")
            if not prompt or not image:
                missing = convention.text if not prompt else convention.path
                raise InputError(f"{row.where}: the {missing} is empty, so prompts and images don't pair up")
            image_path = Path(image) if Path(image).is_absolute() else (path.parent / image)
            if not image_path.is_file():
                raise InputError(f"{row.where}: image not found: {image_path}")
            prompts.append(prompt)
            images.append(image_path.resolve())
        _check_size(name, prompts)
        return ConceptSet(name=name, source=path, prompts=prompts, images=images)
    if {"source", "target"} <= {c.lower() for c in columns}:
        sources, targets = [], []
        keys = {c.lower(): c for c in columns}
        for row in rows:
            source, target = row.values.get(keys["source"], ""), row.values.get(keys["target"], "")
            if not source or not target:
                raise InputError(f"{row.where}: source or target text is empty, so the texts don't pair up")
            sources.append(source)
            targets.append(target)
        _check_size(name, sources)
        return ConceptSet(name=name, source=path, prompts=sources, targets=targets)
    raise InputError(
        f"{path} has columns {columns}; a concept file needs 'prompt,image' (or 'source,target' for text pairs)"
    )


def text_pairs(sources: list[str], targets: list[str], name: str = "texts", source: Path | None = None) -> ConceptSet:
    """A text-to-text concept set from two equally long lists (``source``: the file they came from)."""
    if len(sources) != len(targets):
        raise InputError(f"{len(sources)} source texts but {len(targets)} target texts: they must pair up")
    if any(not s.strip() for s in sources) or any(not t.strip() for t in targets):
        raise InputError("source and target texts must not be empty")
    _check_size(name, list(sources))
    return ConceptSet(name=name, source=source or Path("."), prompts=list(sources), targets=list(targets))


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one prompt or caption a line)."""
    return [line for line in _read_lines(path) if line]
