"""`sce index export`: a collection's embeddings, original or corrected, in clip-retrieval's layout.

The inverse of ``sce index import`` (:mod:`indexing.embedding_import`): ``img_emb/img_emb_{i}.npy``
(or ``text_emb/text_emb_{i}.npy`` for captions) and ``metadata/metadata_{i}.parquet`` in the same
row order, ``shard_rows`` rows a shard, written by :class:`~indexing.embedding_layout.LayoutWriter`
(a hidden folder renamed into place when complete; a non-empty target is refused).

What is written:

- no correction: the stored encoder outputs as they are (not normalised); an image export
  also writes the caption embeddings in ``text_emb/`` when the collection has any (an
  all-zero row for an item without one, which import reads as "none");
- a correction with a re-indexed version: the vectors that version's index holds, read back
  from faiss (what searching with it ranks);
- a correction without one: what a re-index would store, computed by the re-index code itself
  (:func:`retrieval.reindex.plan_reindex` and ``corrected_vectors``): P x of the unit stored x for a projection, the
  paired correction renormalised otherwise.

Metadata columns: ``image_path`` (the item's URI), ``caption``, ``id`` (this collection's item
id), ``sha256``, ``width``, ``height``, then the metadata keys (a key that clashes with one of
those is written as ``metadata.<key>``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from indexing.catalog import EmbeddingKind
from indexing.collection import Collection
from indexing.vector_index import unit_rows
from indexing.embedding_layout import CAPTION_COLUMN, PATH_COLUMN, LayoutWriter
from retrieval.reindex import corrected_vectors, plan_reindex
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 100_000
CHUNK_ROWS = 4096  # ids fetched at a time (the store's IN-query path)
FIXED_COLUMNS = (PATH_COLUMN, CAPTION_COLUMN, "id", "sha256", "width", "height")


@dataclass
class ExportReport:
    out_dir: Path
    kind: str
    correction: str | None
    source: str  # "stored embeddings", "index version NAME" or "computed (projection|paired)"
    rows: int
    shards: int
    dim: int
    dtype: str
    captions: int = 0  # caption rows written beside an image export


def export_embeddings(
    collection: Collection,
    out_dir: str | Path,
    *,
    correction: str | None = None,
    kind: str = EmbeddingKind.IMAGE,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    dtype: str = "float32",
    progress: bool = True,
) -> ExportReport:
    """Write ``kind``'s embeddings (``correction`` applied) to ``out_dir`` (see the module docstring)."""
    if kind not in (EmbeddingKind.IMAGE, EmbeddingKind.CAPTION):
        raise InputError(f"--kind must be image or caption, got {kind!r}")
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype must be float16 or float32, got {dtype!r}")
    if int(shard_rows) < 1:
        raise InputError(f"--shard-size must be >= 1, got {shard_rows}")
    if collection.encoder_name is None:
        raise InputError(f"collection {collection.root} is empty; nothing to export")
    ids, fetch, dim, source = _vector_source(collection, kind, correction)
    ids = np.intersect1d(ids, collection.item_ids())  # ids deleted since an index file was written: gone
    if not len(ids):
        raise InputError(f"collection {collection.root} has no {kind} embeddings to export")
    caption_ids = (collection.embeddings.ids(EmbeddingKind.CAPTION)
                   if correction is None and kind == EmbeddingKind.IMAGE else np.zeros(0, np.int64))
    which = "image" if kind == EmbeddingKind.IMAGE else "text"
    report = ExportReport(Path(out_dir), str(kind), correction, source, len(ids), 0, dim, dtype)
    bar = tqdm(total=len(ids), unit="vec", desc="exporting", disable=not progress)
    with bar, LayoutWriter(out_dir) as writer:
        for number, start in enumerate(range(0, len(ids), int(shard_rows))):
            shard_ids = ids[start : start + int(shard_rows)]
            vectors = writer.vectors(which, number, len(shard_ids), dim, dtype)
            texts = (writer.vectors("text", number, len(shard_ids), collection.dim, dtype)
                     if len(caption_ids) else None)
            columns = _Columns()
            for offset in range(0, len(shard_ids), CHUNK_ROWS):
                chunk = shard_ids[offset : offset + CHUNK_ROWS]
                vectors[offset : offset + len(chunk)] = fetch(chunk)
                if texts is not None:
                    has = np.isin(chunk, caption_ids)
                    block = np.zeros((len(chunk), texts.shape[1]), dtype=np.float32)
                    if has.any():
                        block[has] = collection.embeddings.get(EmbeddingKind.CAPTION, chunk[has])
                    texts[offset : offset + len(chunk)] = block
                    report.captions += int(has.sum())
                records = collection.items(chunk)
                for item_id in chunk.tolist():
                    record = records.get(item_id)
                    if record is None:
                        raise InputError(f"item {item_id} was deleted during the export; nothing was written")
                    columns.add(record)
                bar.update(len(chunk))
            for array in (vectors, texts):
                if array is not None:
                    array.flush()
            del vectors, texts
            writer.metadata(number, columns.table())
            report.shards += 1
    logger.info("exported %d %s vectors (%s) to %s in %d shards", report.rows, kind, source, out_dir, report.shards)
    return report


def _vector_source(
    collection: Collection, kind: str, correction: str | None,
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], int, str]:
    """(ids, fetch(ids) -> float32 rows, dimension, what they are) of the vectors to export."""
    store = collection.embeddings
    if correction is None:
        dim = int(collection.dim)
        return store.ids(kind), lambda ids: store.get(kind, ids), dim, "stored embeddings"
    plan = plan_reindex(collection, correction)
    if plan.kind != kind:
        raise InputError(f"correction {correction!r} applies to the {plan.kind} index; export it with --kind {plan.kind}")
    version = collection.current_version(kind, correction)
    if version is None:
        def corrected(ids: np.ndarray) -> np.ndarray:  # what a re-index of it would store
            vectors = corrected_vectors(collection, plan, ids, store.get(kind, ids))
            return unit_rows(vectors) if plan.normalize_output else vectors

        return store.ids(kind), corrected, plan.dim, f"computed ({plan.variant}; no re-indexed version)"
    _, index = collection.open_index(version)
    return (np.sort(index.ids()), lambda ids: held_vectors(index.index, ids), int(version.dim),
            f"index version {version.name}")


def held_vectors(index: Any, ids: np.ndarray) -> np.ndarray:
    """The vectors a faiss ``IndexIDMap2`` holds for ``ids`` (an IVF index gets its direct map
    first; a compressed index returns its reconstructions, which is what it searches)."""
    import faiss

    keys = np.ascontiguousarray(ids, dtype=np.int64)
    try:
        return index.reconstruct_batch(keys)
    except RuntimeError:
        try:
            faiss.extract_index_ivf(index.index).make_direct_map()
        except RuntimeError as error:
            raise InputError(f"the index cannot return its vectors ({error}); export without --correction "
                             "or re-index with a flat factory") from None
        return index.reconstruct_batch(keys)


class _Columns:
    """A shard's metadata rows gathered as parquet columns (keys may differ between items)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, record: Any) -> None:
        row = {PATH_COLUMN: record.uri, CAPTION_COLUMN: record.caption, "id": record.id,
               "sha256": record.sha256 or None, "width": record.width, "height": record.height}
        for key, value in record.metadata.items():
            row[f"metadata.{key}" if key in FIXED_COLUMNS else key] = value
        self.rows.append(row)

    def table(self) -> dict[str, list[Any]]:
        keys = sorted({key for row in self.rows for key in row} - set(FIXED_COLUMNS))
        return {key: [row.get(key) for row in self.rows] for key in (*FIXED_COLUMNS, *keys)}

