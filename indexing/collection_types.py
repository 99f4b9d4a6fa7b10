"""The value types and errors of :mod:`indexing.collection` (imported from there)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexing.index_versions import IndexVersionInfo
from sce_correct.errors import ConflictError, NotFoundError


class CollectionNotFoundError(NotFoundError, FileNotFoundError):
    """There is no collection catalog where one was expected."""


class EncoderMismatchError(ConflictError, ValueError):
    """A collection or index version was opened with an encoder other than its own."""


class CollectionBusyError(ConflictError):
    """Another process is writing to the collection."""


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    item_id: int
    uri: str
    caption: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class CollectionInfo:
    root: Path
    catalog_url: str
    encoder: str | None
    dim: int | None
    items: int
    embeddings: dict[str, int]
    failures: dict[str, int]
    versions: list[IndexVersionInfo]
    encoder_weights: str | None = None  # the weights id recorded at binding (None: unknown)
