"""FAISS index files: unit-norm vectors under catalog ids, inner-product search, atomic saves.

A :class:`VectorIndex` is one ``faiss.IndexIDMap2`` over an inner-product index built from
an ``index_factory`` string ("Flat" by default). The FAISS ids are the catalog's item ids.
Which encoder, dimension and correction an index file holds is recorded in the catalog's
``index_versions`` table; :mod:`indexing.collection` is the one place that writes both.
"""
from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from indexing.atomic import fsync_directory, write_atomically  # noqa: F401  (re-exported: callers import it from here)

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


def unit_rows_into(out: np.ndarray, vectors: np.ndarray, block: int = 256) -> np.ndarray:
    """Write the unit-length rows of ``vectors`` into ``out`` (float32, C-contiguous); returns it.

    The same numbers as :func:`unit_rows` (the norm is ``sqrt(add.reduce(x * x))``, as in
    ``np.linalg.norm``), in one pass over the source (a memory map, say) and with no
    temporary larger than a cache-sized block: a re-index normalises a chunk while copying
    it into a reused buffer.
    """
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != vectors.shape or out.ndim != 2:
        raise ValueError(f"out must be a float32 C-contiguous array of shape {vectors.shape}")
    if vectors.dtype != np.float32:  # squares of float16 are taken in float32, as unit_rows does
        np.copyto(out, vectors, casting="same_kind")
        vectors = out
    scratch = np.empty((min(block, len(vectors)), vectors.shape[1]), dtype=np.float32)
    for start in range(0, len(vectors), block):
        source, target = vectors[start : start + block], out[start : start + block]
        squares = np.multiply(source, source, out=scratch[: len(source)])
        norms = np.sqrt(np.add.reduce(squares, axis=1))[:, None]
        norms[norms == 0] = 1  # zero rows stay zero
        np.divide(source, norms, out=target)
    return out


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


def check_dim(rows: np.ndarray, dim: int) -> None:
    """ValueError unless the 2-d ``rows`` have ``dim`` columns."""
    if rows.shape[1] != dim:
        raise ValueError(f"vectors have dimension {rows.shape[1]}, the index has dimension {dim}")


def check_addition(
    ids: np.ndarray, rows: np.ndarray, dim: int, present: Callable[[], np.ndarray] | None,
) -> None:
    """The checks before adding ``rows`` (2-d) under ``ids`` (1-d int64) to an index of ``dim``.

    The dimension, one id per row and, unless ``present`` is None, ids that repeat or that
    ``present()`` (the ids held already) holds.
    """
    check_dim(rows, dim)
    if len(ids) != len(rows):
        raise ValueError(f"{len(ids)} ids for {len(rows)} vectors")
    if present is not None:
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids passed to add() repeat")
        held = np.isin(ids, present())
        if held.any():
            raise ValueError(f"ids already in the index: {ids[held][:10].tolist()}")


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
        except RuntimeError as error:  # faiss's message, without its C++ function and source line
            import re  # here, so this hunk stays clear of the file's imports (being rewritten elsewhere)

            from sce_correct.errors import InputError

            reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", str(error), flags=re.S)
            raise InputError(f"--factory {factory!r} is not a faiss index factory string for {dim}-d vectors "
                             f"(see faiss's index_factory docs): {reason}") from error
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
        check_addition(ids, rows, self.dim, self.ids if check_new else None)
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
        check_dim(rows, self.dim)


# -- an index file built on disk, resumable ------------------------------------------------
# faiss's serialization of an IndexIDMap2 over a flat inner-product index (index_write.cpp):
#   "IxM2" header  "IxFI" header  u64 n*dim  n x dim float32  u64 n  n int64 ids
# with header = i32 dim, i64 ntotal, i64 2^20, i64 2^20, u8 is_trained, i32 metric type.
# `flat_layout_matches_faiss` checks it against faiss itself before a file is published so.
_FLAT_HEADER = struct.Struct("<iqqqBi")
_U64 = struct.Struct("<Q")
_STAGED_FORMAT = "sce-staged-flat-1"


def _flat_prefix(dim: int, count: int) -> bytes:
    header = _FLAT_HEADER.pack(dim, count, 1 << 20, 1 << 20, 1, faiss.METRIC_INNER_PRODUCT)
    return b"IxM2" + header + b"IxFI" + header + _U64.pack(count * dim)


@functools.lru_cache(maxsize=None)
def flat_layout_matches_faiss(dim: int) -> bool:
    """Whether a file laid out by :class:`StagedVectors` is what faiss writes for ``Flat``."""
    index = VectorIndex.create(dim, DEFAULT_FACTORY)
    vectors = np.arange(3 * dim, dtype=np.float32).reshape(3, dim)
    ids = np.array([7, 3, 11], dtype=np.int64)
    index.index.add_with_ids(vectors, ids)
    expected = faiss.serialize_index(index.index).tobytes()
    ours = _flat_prefix(dim, 3) + vectors.tobytes() + _U64.pack(3) + ids.tobytes()
    if expected != ours:
        logger.warning("faiss %s writes flat indexes in another layout; building them in memory",
                       getattr(faiss, "__version__", "?"))
    return expected == ours


_BLOCK = 4096  # alignment of O_DIRECT writes (offsets, lengths and the buffer)


def _open_direct(path: Path) -> int:
    """A write-only O_DIRECT descriptor of ``path``, or -1 where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("SCE_NO_DIRECT_IO"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return -1


def _pwrite_all(descriptor: int, data: np.ndarray | bytes, offset: int) -> None:
    view = memoryview(data).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
    while len(view):
        written = os.pwrite(descriptor, view, offset)
        view, offset = view[written:], offset + written


def _pread_into(descriptor: int, array: np.ndarray, offset: int) -> np.ndarray:
    if not array.size:
        return array
    view = memoryview(array).cast("B")
    while len(view):
        read = os.preadv(descriptor, [view], offset)
        if read == 0:
            raise EOFError(f"staged index file ends before byte {offset + len(view)}")
        view, offset = view[read:], offset + read
    return array


class StagedVectors:
    """The vectors and ids of an index being built, on disk, resumable after a kill.

    One staging file laid out like faiss's own file of a flat ``IndexIDMap2`` with room for
    ``capacity`` rows (``[prefix][capacity x dim float32][u64][ids]``): rows are appended
    with ``pwrite`` and never held in memory. :meth:`checkpoint` fsyncs the file, then
    records ``count`` in a small JSON progress file written atomically; that record is all
    a resume trusts, so a kill at any moment leaves a consistent state (rows past the
    recorded count are simply written again). When the index is a flat one,
    :meth:`publish_flat` completes the header and id table and renames the staging file
    into place: the vectors are written to disk once, with no in-memory index and no
    second copy. Other index types are filled from :meth:`rows` and saved as usual.

    Where the platform allows, vectors are written with ``O_DIRECT`` in whole aligned
    blocks (the partial block at the end is kept in memory and written normally at each
    checkpoint): the page cache is bypassed, which on a virtual machine is several times
    cheaper than filling gigabytes of fresh cache pages, and there is little left for the
    fsyncs to flush. Writes are also paced: every ``flush_bytes`` the file is fdatasync'ed,
    so the disk works while vectors are being computed and the fsync before publishing is
    short.
    """

    def __init__(self, progress_path: Path, file: Path, descriptor: int, dim: int,
                 capacity: int, count: int, ids_offset: int, ids: np.ndarray,
                 flush_bytes: int) -> None:
        self.progress_path = progress_path
        self.file = file
        self.dim = dim
        self.capacity = capacity
        self.count = count
        self.flush_bytes = flush_bytes
        self._fd = descriptor
        self._ids_offset = ids_offset
        self._ids = ids
        self._recorded = count if progress_path.exists() else -1  # -1: no record yet
        self._unsynced = 0
        # O_DIRECT writes of the vectors: whole _BLOCK-aligned blocks from an aligned buffer
        self._direct = _open_direct(file)
        self._aligned: mmap.mmap | None = None
        self._tail_offset = 0  # the partial last block: file bytes not yet written directly
        self._tail = b""
        self._tail_dirty = False

    # -- layout -------------------------------------------------------------------------------
    @property
    def _row_bytes(self) -> int:
        return 4 * self.dim

    @property
    def _codes_offset(self) -> int:
        return len(_flat_prefix(self.dim, 0))

    def _packed_ids_offset(self, capacity: int) -> int:
        return self._codes_offset + capacity * self._row_bytes + _U64.size

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, progress_path: str | Path, dim: int, capacity: int = 1024,
               flush_bytes: int = 64 << 20) -> StagedVectors:
        """A new, empty staging file beside ``progress_path`` (nothing recorded yet)."""
        progress_path = Path(progress_path)
        progress_path.parent.mkdir(parents=True, exist_ok=True)
        capacity = max(int(capacity), 1)
        file = progress_path.with_name(f"{progress_path.stem}.{uuid.uuid4().hex[:8]}.partial")
        descriptor = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        staged = cls(progress_path, file, descriptor, dim, capacity, 0, 0,
                     np.empty(capacity, dtype=np.int64), flush_bytes)
        staged._ids_offset = staged._packed_ids_offset(capacity)
        os.ftruncate(descriptor, staged._ids_offset + 8 * capacity)
        return staged

    @classmethod
    def open(cls, progress_path: str | Path, dim: int,
             flush_bytes: int = 64 << 20) -> StagedVectors | None:
        """The staged vectors recorded in ``progress_path``; None when there is no usable record."""
        progress_path = Path(progress_path)
        try:
            record = json.loads(progress_path.read_text())
            if record.get("format") != _STAGED_FORMAT or int(record["dim"]) != dim:
                logger.warning("ignoring %s: another format or dimension", progress_path)
                return None
            file = progress_path.with_name(str(record["file"]))
            capacity, count = int(record["capacity"]), int(record["count"])
            ids_offset = int(record["ids_offset"])
            descriptor = os.open(file, os.O_RDWR)
        except (OSError, ValueError, KeyError, TypeError) as error:
            if progress_path.exists():
                logger.warning("ignoring unusable build progress %s: %s", progress_path, error)
            return None
        try:
            ids = np.empty(max(capacity, count, 1), dtype=np.int64)
            _pread_into(descriptor, ids[:count], ids_offset)
            size = os.fstat(descriptor).st_size
            if size < len(_flat_prefix(dim, 0)) + count * 4 * dim:
                raise EOFError("the staged vectors are shorter than recorded")
        except (OSError, EOFError) as error:
            os.close(descriptor)
            logger.warning("ignoring unusable build progress %s: %s", progress_path, error)
            return None
        return cls(progress_path, file, descriptor, dim, capacity, count, ids_offset, ids, flush_bytes)

    # -- reading ------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """The ids staged so far, in order (a copy)."""
        return self._ids[: self.count].copy()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Staged vectors ``start:stop`` (read from the file)."""
        self._flush_tail()
        stop = min(stop, self.count)
        out = np.empty((max(stop - start, 0), self.dim), dtype=np.float32)
        return _pread_into(self._fd, out, self._codes_offset + start * self._row_bytes)

    # -- writing ------------------------------------------------------------------------------
    def append(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Stage float32 C-contiguous ``rows`` under ``ids`` after those already staged."""
        n = len(ids)
        if rows.shape != (n, self.dim) or rows.dtype != np.float32 or not rows.flags.c_contiguous:
            raise ValueError(f"expected ({n}, {self.dim}) float32 C-contiguous rows, got {rows.shape}")
        if self.count + n > self.capacity:
            self._grow(self.count + n)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._write_rows(rows, self._codes_offset + self.count * self._row_bytes)
        _pwrite_all(self._fd, ids, self._ids_offset + 8 * self.count)
        self._ids[self.count : self.count + n] = ids
        self.count += n
        self._unsynced += rows.nbytes + ids.nbytes
        if self._unsynced >= self.flush_bytes:
            self._sync()

    def checkpoint(self) -> None:
        """Make every staged row durable, then record the count (atomically)."""
        self._sync()
        if self._recorded != self.count:
            self._record()

    def _write_rows(self, rows: np.ndarray, offset: int) -> None:
        data = memoryview(rows).cast("B")
        if self._direct < 0:
            _pwrite_all(self._fd, data, offset)
            return
        start = offset - offset % _BLOCK
        if self._tail_offset == start and len(self._tail) == offset - start:
            prefix = self._tail
        else:  # a resumed job, or the first block (the header's place)
            prefix = os.pread(self._fd, offset - start, start).ljust(offset - start, b"\0")
        if self._tail_dirty and self._tail_offset != start:
            self._flush_tail()
        total = len(prefix) + len(data)
        if self._aligned is None or len(self._aligned) < total:
            if self._aligned is not None:
                self._aligned.close()
            self._aligned = mmap.mmap(-1, -(-total // _BLOCK) * _BLOCK)  # page-aligned
        with memoryview(self._aligned) as buffer:
            buffer[: len(prefix)] = prefix
            buffer[len(prefix) : total] = data
            full = total - total % _BLOCK
            written = 0
            try:
                while written < full:
                    written += os.pwrite(self._direct, buffer[written:full], start + written)
            except OSError as error:  # e.g. EINVAL: this file system wants other alignment
                logger.info("O_DIRECT writes failed (%s); writing through the page cache", error)
                os.close(self._direct)
                self._direct = -1
                _pwrite_all(self._fd, buffer[written:total], start + written)
                self._tail, self._tail_dirty = b"", False
                return
            self._tail_offset, self._tail = start + full, bytes(buffer[full:total])
        self._tail_dirty = bool(self._tail)

    def _flush_tail(self) -> None:
        if self._tail_dirty:
            _pwrite_all(self._fd, self._tail, self._tail_offset)
            self._tail_dirty = False

    def _sync(self) -> None:
        self._flush_tail()
        os.fdatasync(self._fd)
        self._unsynced = 0

    def _record(self) -> None:
        record = {"format": _STAGED_FORMAT, "file": self.file.name, "dim": self.dim,
                  "capacity": self.capacity, "count": self.count, "ids_offset": self._ids_offset}
        text = json.dumps(record)
        write_atomically(self.progress_path, lambda temporary: temporary.write_text(text))
        self._recorded = self.count

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        size = self._packed_ids_offset(capacity) + 8 * capacity
        if size > os.fstat(self._fd).st_size:  # never cut off the recorded id table
            os.ftruncate(self._fd, size)
        ids = np.empty(capacity, dtype=np.int64)
        ids[: self.count] = self._ids[: self.count]
        self._ids = ids
        self._move_ids(self._packed_ids_offset(capacity), capacity)

    def _move_ids(self, target: int, capacity: int) -> None:
        """Put the id table at ``target``; the recorded state stays valid at every step.

        Rows past the old capacity (or the ids' new place inside the old row area) are only
        written once the progress record points at the new place, so the old table is intact
        until then; a table that would overlap its own new place hops past both first.
        """
        ids, size, current = self._ids[: self.count], 8 * self.count, self._ids_offset
        if target != current and target < current + size and current < target + size:
            hop = max(current, target) + size
            _pwrite_all(self._fd, ids, hop)
            self._ids_offset = hop
            self._sync()
            self._record()
        _pwrite_all(self._fd, ids, target)
        self._ids_offset, self.capacity = target, capacity
        self._sync()
        self._record()

    # -- finishing ----------------------------------------------------------------------------
    def publish_flat(self, path: str | Path) -> None:
        """Complete the file as a flat inner-product IndexIDMap2 and rename it to ``path``.

        Header, id table and size are written in place (a kill meanwhile leaves a state
        :meth:`open` resumes from), then the file is fsync'ed and renamed atomically.
        """
        path = Path(path)
        count = self.count
        if self.capacity != count or self._ids_offset != self._packed_ids_offset(count):
            self._move_ids(self._packed_ids_offset(count), count)
        else:
            self.checkpoint()
        _pwrite_all(self._fd, _U64.pack(count), self._codes_offset + count * self._row_bytes)
        _pwrite_all(self._fd, _flat_prefix(self.dim, count), 0)
        os.ftruncate(self._fd, self._packed_ids_offset(count) + 8 * count)
        os.fsync(self._fd)
        self.close()
        os.replace(self.file, path)
        fsync_directory(path.parent)

    def close(self) -> None:
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        if self._aligned is not None:
            self._aligned.close()
            self._aligned = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Delete the staging file (if still there) and the progress record."""
        self.close()
        self.file.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
