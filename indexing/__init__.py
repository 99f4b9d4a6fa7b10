"""Indexing: encoders, readers, the SQL catalog, FAISS index versions and batch pipelines.

Names are re-exported lazily so that ``import indexing`` stays light (no torch, no faiss):

    from indexing import load_encoder, Collection, build_collection
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_encoder": "indexing.encoders",
    "Encoder": "indexing.encoders",
    "open_catalog": "indexing.catalog",
    "Collection": "indexing.collection",
    "CollectionNotFoundError": "indexing.collection",
    "EncoderMismatchError": "indexing.collection",
    "SearchHit": "indexing.collection",
    "IndexVersionInfo": "indexing.index_versions",
    "parse_where": "indexing.items",
    "VectorIndex": "indexing.vector_index",
    "read_source": "indexing.readers",
    "build_collection": "indexing.pipeline",
    "add_to_collection": "indexing.pipeline",
    "BuildReport": "indexing.pipeline",
    "embed_captions": "indexing.captions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'indexing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
