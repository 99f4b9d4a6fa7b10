"""FAISS index files: unit-norm vectors under catalog ids, inner-product search, atomic saves.

A :class:`VectorIndex` is one ``faiss.IndexIDMap2`` over an inner-product index built from
an ``index_factory`` string ("Flat" by default). The FAISS ids are the catalog's item ids.
Which encoder, dimension and correction an index file holds is recorded in the catalog's
``index_versions`` table; :mod:`indexing.collection` is the one place that writes both.
"""
from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from indexing.atomic import write_atomically  # noqa: F401  (re-exported: callers import it from here)

logger = logging.getLogger(__name__)

DEFAULT_FACTORY = "Flat"


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32, C-contiguous copies of the rows scaled to unit length (zero rows stay zero)."""
    rows = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if rows.ndim != 2:
        raise ValueError(f"vectors must be 2-d (n, dim), got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.divide(rows, norms, out=rows, where=norms > 0)
    return rows


def _float_rows(vectors: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"vectors must be 2-d (n, dim), got shape {rows.shape}")
    return rows


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    array = np.ascontiguousarray(ids, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"ids must be 1-d, got shape {array.shape}")
    return array


class VectorIndex:
    """An inner-product FAISS index of unit-norm vectors keyed by catalog ids."""

    def __init__(self, index: faiss.Index, factory: str = DEFAULT_FACTORY) -> None:
        if not isinstance(index, faiss.IndexIDMap2):
            raise TypeError(f"expected a faiss.IndexIDMap2, got {type(index).__name__}")
        self.index = index
        self.factory = factory
        self.changes = 0  # counts add/remove/train calls, so callers can skip a no-op save

    @classmethod
    def create(cls, dim: int, factory: str | None = None) -> VectorIndex:
        """An empty index; ``factory`` is any faiss ``index_factory`` string ("Flat" default)."""
        factory = factory or DEFAULT_FACTORY
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"invalid faiss index factory string {factory!r}: {error}") from error
        return cls(faiss.IndexIDMap2(inner), factory)

    @classmethod
    def load(cls, path: str | Path, factory: str = DEFAULT_FACTORY) -> VectorIndex:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"index file {path} does not exist")
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        return cls(index, factory)

    def save(self, path: str | Path) -> None:
        """Save atomically (temporary file, fsync, rename)."""
        write_atomically(path, lambda temporary: faiss.write_index(self.index, str(temporary)))

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def ids(self) -> np.ndarray:
        """The ids held, in insertion order."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    def train(self, vectors: np.ndarray) -> None:
        """Train the inner index (IVF, PQ, ...) on a sample; a no-op for flat indexes."""
        if self.is_trained:
            return
        sample = unit_rows(vectors)
        self._check_dim(sample)
        try:
            self.index.train(sample)
            self.changes += 1
        except RuntimeError as error:
            raise ValueError(
                f"cannot train faiss index {self.factory!r} on {len(sample)} vectors: {error}"
            ) from error

    def add(
        self,
        ids: np.ndarray | list[int],
        vectors: np.ndarray,
        *,
        check_new: bool = True,
        normalize: bool = True,
    ) -> None:
        """Add unit-norm copies of ``vectors`` under ``ids``.

        An id already present is an error (IndexIDMap2 would silently hold both); callers
        that add ids known to be new (a re-index from the store) pass ``check_new=False``
        to skip the O(n) check. ``normalize=False`` stores the vectors as given: a
        projection-corrected version needs that, because ranking q . (P x) equals ranking
        (P q) . x only when P x keeps its length.
        """
        ids = _as_ids(ids)
        rows = unit_rows(vectors) if normalize else _float_rows(vectors)
        self._check_dim(rows)
        if len(ids) != len(rows):
            raise ValueError(f"{len(ids)} ids for {len(rows)} vectors")
        if check_new:
            if len(np.unique(ids)) != len(ids):
                raise ValueError("ids passed to add() repeat")
            present = np.isin(ids, self.ids())
            if present.any():
                raise ValueError(f"ids already in the index: {ids[present][:10].tolist()}")
        if not self.is_trained:
            raise ValueError(f"faiss index {self.factory!r} must be trained before adding")
        if len(ids):
            self.index.add_with_ids(rows, ids)
            self.changes += 1

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ``ids`` (absent ones are ignored); returns how many were removed.

        Raises NotImplementedError for index types that cannot delete (HNSW): rebuild those.
        """
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        try:
            removed = int(self.index.remove_ids(ids))
        except RuntimeError as error:
            raise NotImplementedError(
                f"faiss index {self.factory!r} does not support removal: {error}"
            ) from error
        self.changes += bool(removed)
        return removed

    def set_nprobe(self, nprobe: int) -> None:
        """How many inverted lists an IVF index visits per query (ignored for other types)."""
        try:
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        except RuntimeError:
            logger.debug("nprobe ignored: %s is not an IVF index", self.factory)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity: (scores, ids), each (n_queries, k); missing slots are -1."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        rows = unit_rows(np.atleast_2d(queries))
        self._check_dim(rows)
        if self.count == 0:
            n = len(rows)
            return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, np.int64)
        scores, ids = self.index.search(rows, int(k))
        return scores, ids

    def _check_dim(self, rows: np.ndarray) -> None:
        if rows.shape[1] != self.dim:
            raise ValueError(
                f"vectors have dimension {rows.shape[1]}, the index has dimension {self.dim}"
            )
