"""Caption embeddings: items with a caption also get a text embedding and a caption index.

Caption vectors are stored once, like image vectors, under the same item ids (kind
"caption"), so the caption index stays in step with the catalog: an item without a caption
has no caption vector, and deleting an item removes both.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from indexing.catalog import EmbeddingKind
from indexing.collection import Collection, IndexVersionInfo

logger = logging.getLogger(__name__)


def captioned_items(collection: Collection) -> tuple[np.ndarray, list[str]]:
    """(ids, captions) of the items that have a non-empty caption, by id."""
    return collection.items_store.captions()


def pending_captions(collection: Collection) -> tuple[np.ndarray, list[str]]:
    """(ids, captions) of the captioned items that have no stored caption vector yet."""
    ids, captions = captioned_items(collection)
    have = collection.embeddings.ids(EmbeddingKind.CAPTION)
    todo = ~np.isin(ids, have)
    return ids[todo], [c for c, t in zip(captions, todo) if t]


def embed_captions(collection: Collection, encoder, *, batch_size: int = 1024, progress: bool = False,
                   factory: str | None = None) -> IndexVersionInfo | None:
    """Encode the captions that have no stored vector yet, store them and sync the caption index.

    Resumable: each batch is committed on its own, and a rerun encodes only what is missing.
    Returns the caption index version, or None when no item has a caption.
    """
    collection.check_encoder(encoder.name, encoder.dim)
    ids, captions = pending_captions(collection)
    with tqdm(total=len(ids), desc="captions", unit="text", disable=not progress or not len(ids)) as bar:
        for start in range(0, len(ids), batch_size):
            chunk_ids = ids[start:start + batch_size]
            vectors = encoder.encode_texts(captions[start:start + batch_size])
            collection.store_embeddings(EmbeddingKind.CAPTION, chunk_ids, vectors)
            bar.update(len(chunk_ids))
    if len(ids):
        logger.info("stored %d caption embeddings", len(ids))
    if collection.embeddings.count(EmbeddingKind.CAPTION) == 0:
        return None
    return collection.sync_index(EmbeddingKind.CAPTION, factory)
