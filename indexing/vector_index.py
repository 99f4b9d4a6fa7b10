"""FAISS index files: unit-norm vectors under catalog ids, inner-product search, atomic saves.

A :class:`VectorIndex` is one ``faiss.IndexIDMap2`` over an inner-product index built from
an ``index_factory`` string ("Flat" by default), or an IVF version whose inverted lists are
on disk and hold the ids themselves (:mod:`indexing.ondisk_ivf`). The FAISS ids are the
catalog's item ids.
Which encoder, dimension and correction an index file holds is recorded in the catalog's
``index_versions`` table; :mod:`indexing.collection` is the one place that writes both.

Every index file is written by faiss (``faiss.write_index``). :class:`StagedVectors` holds
the vectors of a version being built, checkpointed as numpy ``.npy`` segments so that a
killed build resumes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexing import ondisk_ivf
from indexing.atomic import write_atomically
from indexing.index_factory import is_auto, resolve_factory
from sce_correct.errors import InputError

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
        raise InputError(f"vectors have dimension {rows.shape[1]}, the index has dimension {dim}")


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

    def __init__(self, index: faiss.Index, factory: str = DEFAULT_FACTORY, path: Path | None = None) -> None:
        self.ondisk = not isinstance(index, faiss.IndexIDMap2) and ondisk_ivf.ondisk_lists(index) is not None
        if not isinstance(index, faiss.IndexIDMap2) and not self.ondisk:
            raise TypeError(f"expected a faiss.IndexIDMap2 or an on-disk IVF, got {type(index).__name__}")
        self.index = index
        self.factory = factory
        self.path = path  # the file it was read from (an on-disk IVF's changes go to a copy beside it)
        self.changes = 0  # counts add/remove/train calls, so callers can skip a no-op save
        self._lists_file: Path | None = None  # an on-disk IVF's copied lists, once changed
        self._replaced_lists: str | None = None  # and the name of the lists they replace

    @classmethod
    def create(cls, dim: int, factory: str | None = None) -> VectorIndex:
        """An empty index; ``factory`` is any faiss ``index_factory`` string ("Flat" default)."""
        factory = factory or DEFAULT_FACTORY
        if is_auto(factory):  # what auto chooses for an empty index; builds resolve it by size
            factory = resolve_factory(factory, 0, dim)[0]
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:  # faiss's message, without its C++ function and source line
            reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", str(error), flags=re.S)
            raise InputError(f"--factory {factory!r} is not a faiss index factory string for {dim}-d vectors "
                             f"(see faiss's index_factory docs): {reason}") from error
        return cls(faiss.IndexIDMap2(inner), factory)

    @classmethod
    def load(cls, path: str | Path, factory: str = DEFAULT_FACTORY) -> VectorIndex:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"index file {path} does not exist")
        # on-disk lists memory-mapped, read-only; faiss.read_index returns the concrete type
        # (a downcast_index of it would be a second wrapper that does not own the index)
        return cls(ondisk_ivf.read(path), factory, path)

    def save(self, path: str | Path) -> None:
        """Save atomically (temporary file, fsync, rename); an on-disk IVF's changed lists are
        renamed into place first (:func:`indexing.ondisk_ivf.commit`)."""
        path = Path(path)
        if self.ondisk:
            ondisk_ivf.commit(self.index, path, self._lists_file, keep=self._replaced_lists)
            self._lists_file, self.path = None, path
            return
        write_atomically(path, lambda temporary: faiss.write_index(self.index, str(temporary)))

    def _writable(self) -> None:
        """Before an on-disk IVF's first change: copy its lists (the published file stays as is)."""
        if self.ondisk and self._lists_file is None:
            if self.path is None:
                raise ValueError("an on-disk index must be read from its file before it is changed")
            self._replaced_lists = Path(ondisk_ivf.ondisk_lists(self.index).filename).name
            self._lists_file = ondisk_ivf.copy_lists(self.index, self.path)

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
        """The ids held (in insertion order; an on-disk IVF's list by list)."""
        if self.ondisk:
            return ondisk_ivf.list_ids(self.index)
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
            raise InputError(
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
        bad = nonfinite_rows(rows)
        if bad:
            raise InputError(f"{bad} of {len(rows)} vectors hold NaN or infinite values; none was added")
        if not self.is_trained:
            raise ValueError(f"faiss index {self.factory!r} must be trained before adding")
        if len(ids):
            self._writable()
            with ondisk_ivf.faiss_stdout_to_stderr() if self.ondisk else contextlib.nullcontext():  # "resizing ..."
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
            self._writable()
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
            raise InputError(f"k must be positive, got {k}")
        rows = unit_rows(np.atleast_2d(queries))
        self._check_dim(rows)
        if self.count == 0:
            n = len(rows)
            return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, np.int64)
        scores, ids = self.index.search(rows, int(k))
        return scores, ids

    def _check_dim(self, rows: np.ndarray) -> None:
        check_dim(rows, self.dim)


# -- the vectors of a version being built, checkpointed in segments -------------------------
_STAGED_FORMAT = "sce-staged-segments-1"


def nonfinite_rows(rows: np.ndarray) -> int:
    """How many rows of the 2-d float array ``rows`` hold a NaN or an infinite value."""
    with np.errstate(over="ignore", invalid="ignore"):
        if not rows.size or np.isfinite(np.add.reduce(rows, axis=None)):
            return 0  # one pass: a finite sum means finite values (an overflow is counted below)
    return int(np.count_nonzero(~np.isfinite(rows).all(axis=1)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.save would append ".npy" to a name
            np.save(handle, array, allow_pickle=False)

    write_atomically(path, write)


@dataclass(frozen=True)
class _Segment:
    name: str   # its files are <name>.ids.npy and <name>.rows.npy, beside the progress record
    count: int
    bad: int    # rows holding NaN or infinite values


class StagedVectors:
    """The vectors and ids of an index version being built, resumable after a kill.

    Rows are added to an in-memory ``IndexIDMap2`` over a flat inner-product index. With
    ``hold`` (a flat version) it keeps every row and is the version's index: publishing is
    one ``faiss.write_index`` of :meth:`as_index`. Without (another factory, filled from the
    rows at publish) it keeps only the rows since the last checkpoint, and :meth:`chunks`
    reads the older ones back from their segments.

    :meth:`checkpoint` writes the rows added since the previous checkpoint as one segment,
    two ``.npy`` files (numpy's own format: the ids and the rows, each written atomically),
    then the progress record, a small JSON file written atomically that lists the segments.
    That record is all a resume trusts, so a kill at any moment leaves a consistent state;
    :meth:`open` reads its segments back. A checkpoint writes only what is new, and with
    ``wait=False`` a background thread writes it while rows keep being staged (rows are only
    added where they move nothing that is being written). Each row's NaN and infinite values
    are counted as it is staged (:attr:`bad_rows`), so that no such version is published.
    """

    def __init__(self, progress_path: Path, dim: int, hold: bool, expected: int = 0) -> None:
        self.progress_path = progress_path
        self.dim = dim
        self.hold = hold
        self.expected = max(int(expected), 0)  # how many rows the caller means to stage
        # hold: every staged row; otherwise the rows staged since the last checkpoint
        self._index: faiss.IndexIDMap2 | None = VectorIndex.create(dim, DEFAULT_FACTORY).index
        self._reserve = self.expected if hold else 0
        self._segments: list[_Segment] = []
        self._segment_ids: list[np.ndarray] = []
        self._saved = 0  # rows in segments
        self._pending_bad = 0
        self._recorded = False
        self._capacity = 0  # rows the in-memory index holds without moving them
        self._saving: threading.Thread | None = None  # a checkpoint being written
        self._save_error: BaseException | None = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, progress_path: str | Path, dim: int, *, hold: bool = True, expected: int = 0) -> StagedVectors:
        """New, empty staged vectors recorded at ``progress_path`` (nothing recorded yet)."""
        progress_path = Path(progress_path)
        progress_path.parent.mkdir(parents=True, exist_ok=True)
        return cls(progress_path, int(dim), hold, expected)

    @classmethod
    def open(cls, progress_path: str | Path, dim: int, *, hold: bool = True,
             expected: int = 0) -> StagedVectors | None:
        """The staged vectors recorded in ``progress_path``; None when there is no usable record."""
        progress_path = Path(progress_path)
        try:
            record = json.loads(progress_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("ignoring unusable build progress %s: %s", progress_path, error)
            return None
        if not isinstance(record, dict) or record.get("format") != _STAGED_FORMAT or record.get("dim") != dim:
            logger.warning("ignoring build progress %s: another format or dimension", progress_path)
            return None
        staged = cls(progress_path, int(dim), hold, expected)
        try:
            for entry in record["segments"]:
                staged._load_segment(str(entry["name"]), int(entry["count"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unusable build progress %s: %s", progress_path, error)
            staged.close()
            return None
        staged._recorded = True
        return staged

    # -- reading ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """How many rows are staged (checkpointed or not)."""
        return self._offset + self._live.ntotal

    @property
    def bad_rows(self) -> int:
        """How many staged rows hold a NaN or an infinite value."""
        return sum(segment.bad for segment in self._segments) + self._pending_bad

    def ids(self) -> np.ndarray:
        """The ids staged so far, in order (a copy)."""
        held = faiss.vector_to_array(self._live.id_map)
        pending = held[self._saved - self._offset :]
        return np.concatenate([*self._segment_ids, pending]).astype(np.int64, copy=False)

    def files(self) -> set[str]:
        """The names of the files this staging consists of (the record and its segments)."""
        return {self.progress_path.name} | {
            f"{segment.name}.{part}.npy" for segment in self._segments for part in ("ids", "rows")
        }

    def chunks(self, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, rows) of every staged row in order, at most ``size`` at a time.

        The rows are views (of the in-memory index, or of a memory-mapped segment): use each
        chunk before staging more.
        """
        self.wait()
        if self.hold:
            ids, rows = self.ids(), self._rows()
            for start in range(0, len(ids), size):
                yield ids[start : start + size], rows[start : start + size]
            return
        for segment, ids in zip(self._segments, self._segment_ids):
            _, rows = self._read_segment(segment.name, segment.count)
            for start in range(0, segment.count, size):
                yield ids[start : start + size], rows[start : start + size]
        pending_ids, pending = faiss.vector_to_array(self._live.id_map), self._rows()
        for start in range(0, len(pending_ids), size):
            yield pending_ids[start : start + size], pending[start : start + size]

    def as_index(self) -> VectorIndex:
        """The staged rows as a flat index (``hold`` only): the flat version's index itself."""
        if not self.hold:
            raise ValueError("only staged vectors that hold every row are an index")
        self.wait()
        return VectorIndex(self._live, DEFAULT_FACTORY)

    # -- writing ------------------------------------------------------------------------------
    def append(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Stage float32 ``rows`` (n, dim) under int64 ``ids`` after those already staged."""
        n = len(ids)
        if rows.shape != (n, self.dim):
            raise ValueError(f"expected ({n}, {self.dim}) rows, got {rows.shape}")
        if not n:
            return
        self._pending_bad += nonfinite_rows(rows)
        self._add(ids, rows)

    def checkpoint(self, wait: bool = True) -> None:
        """Write the rows staged since the last checkpoint as a segment, then the record.

        ``wait=False``: a background thread writes them while rows keep being staged;
        :meth:`wait` joins it (the next checkpoint, and every reader, waits for it first).
        """
        self.wait()
        start = self._saved - self._offset
        new = self._live.ntotal - start
        if not new and self._recorded:
            return
        segment = None
        ids = faiss.vector_to_array(self._live.id_map)[start:]
        rows, held = self._rows()[start:], self._index  # a view, and what keeps it alive
        if new:
            segment = _Segment(f"{self.progress_path.stem}.{uuid.uuid4().hex[:8]}", new, self._pending_bad)
            self._segments.append(segment)
            self._segment_ids.append(ids)
            self._saved += new
            self._pending_bad = 0
            if not self.hold:  # later rows go to a new index; the old one is being written
                self._index = VectorIndex.create(self.dim, DEFAULT_FACTORY).index
        self._recorded = True
        job = functools.partial(self._save, segment, ids, rows, list(self._segments), self._saved, held)
        if wait:
            job()
            self.wait()
        else:
            self._saving = threading.Thread(target=job, name="staged-checkpoint", daemon=True)
            self._saving.start()

    def wait(self) -> None:
        """Block until the last checkpoint is durable; raises what failed in writing it."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._save_error is not None:
            raise self._save_error

    def keep_only(self, keep: np.ndarray) -> None:
        """Drop the staged rows where ``keep`` (one flag per row, in order) is False.

        Segments that lose rows are written again and the record replaced at once, so a kill
        meanwhile leaves either the old checkpoint or the new one.
        """
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != self.count:
            raise ValueError(f"{len(keep)} flags for {self.count} staged rows")
        self.checkpoint()  # every row in a segment first
        gone = self.ids()[~keep]
        segments, segment_ids, replaced, start = [], [], [], 0
        for segment, ids in zip(self._segments, self._segment_ids):
            mask = keep[start : start + segment.count]
            start += segment.count
            if mask.all():
                segments.append(segment)
                segment_ids.append(ids)
                continue
            replaced.append(segment.name)
            if mask.any():
                _, rows = self._read_segment(segment.name, segment.count)
                rows = rows[mask]
                fresh = _Segment(f"{self.progress_path.stem}.{uuid.uuid4().hex[:8]}", int(mask.sum()),
                                 nonfinite_rows(rows))
                self._write_segment(fresh, ids[mask], rows)
                segments.append(fresh)
                segment_ids.append(ids[mask])
        self._segments, self._segment_ids = segments, segment_ids
        self._saved = sum(segment.count for segment in segments)
        if self.hold and len(gone):
            self._live.remove_ids(gone)
        self._record(self._segments, self._saved)
        for name in replaced:
            self._unlink_segment(name)

    def close(self) -> None:
        """Release the in-memory rows (the staging files stay)."""
        if self._saving is not None:  # a failure in it was reported, or no longer matters
            self._saving.join()
            self._saving = None
        self._index = None

    def remove(self) -> None:
        """Delete the staging files: the progress record and every segment."""
        self.close()
        self.progress_path.unlink(missing_ok=True)
        for segment in self._segments:
            self._unlink_segment(segment.name)

    # -- internals ----------------------------------------------------------------------------
    @property
    def _live(self) -> faiss.IndexIDMap2:
        if self._index is None:
            raise ValueError(f"the staged vectors of {self.progress_path} are closed")
        return self._index

    @property
    def _offset(self) -> int:
        """The position among the staged rows of the in-memory index's first row."""
        return 0 if self.hold else self._saved

    def _rows(self) -> np.ndarray:
        """The in-memory index's rows, as a view (valid until rows are added or removed)."""
        flat = faiss.downcast_index(self._live.index)
        n = int(flat.ntotal)
        if not n:
            return np.empty((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def _add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if self._reserve:  # room for every expected row: no regrowing (and copying) as rows come
            self._reserve_rows(self._reserve)
            self._reserve = 0
        if self.hold and self._saving is not None and self._live.ntotal + len(ids) > self._capacity:
            self.wait()  # the index would move its rows, some of which are being written
        self._live.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), np.ascontiguousarray(ids, np.int64))

    def _reserve_rows(self, rows: int) -> None:
        # A resize and back keeps the std::vectors' capacity (C++ guarantees it): later adds
        # fill it instead of reallocating. Only a speed-up; nothing depends on it.
        flat = faiss.downcast_index(self._live.index)
        if rows > flat.ntotal:
            held = int(flat.ntotal)
            flat.codes.resize(rows * flat.code_size)
            flat.codes.resize(held * flat.code_size)
            self._live.id_map.resize(rows)
            self._live.id_map.resize(held)
            self._capacity = rows

    def _path(self, name: str, part: str) -> Path:
        if Path(name).name != name or not name.startswith(self.progress_path.stem):
            raise ValueError(f"not a segment of {self.progress_path.name}: {name!r}")
        return self.progress_path.with_name(f"{name}.{part}.npy")

    def _write_segment(self, segment: _Segment, ids: np.ndarray, rows: np.ndarray) -> None:
        _save_npy(self._path(segment.name, "rows"), rows)
        _save_npy(self._path(segment.name, "ids"), ids)

    def _save(self, segment: _Segment | None, ids: np.ndarray, rows: np.ndarray,
              segments: list[_Segment], saved: int, _held: object) -> None:
        """A checkpoint's writes: the segment (if any), then the record listing ``segments``."""
        try:
            if segment is not None:
                self._write_segment(segment, ids, rows)
            self._record(segments, saved)
        except BaseException as error:  # noqa: BLE001 - raised by wait()
            self._save_error = error

    def _read_segment(self, name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """A segment's ids and its rows (memory-mapped), checked against the record."""
        ids = np.load(self._path(name, "ids"), allow_pickle=False)
        rows = np.load(self._path(name, "rows"), mmap_mode="r", allow_pickle=False)
        if (ids.shape, ids.dtype, rows.shape, rows.dtype) != ((count,), np.int64, (count, self.dim), np.float32):
            raise ValueError(f"segment {name} does not hold {count} rows of dimension {self.dim}")
        return ids, rows

    def _load_segment(self, name: str, count: int) -> None:
        ids, rows = self._read_segment(name, count)
        bad = nonfinite_rows(rows)
        if self.hold:
            self._add(ids, rows)
        self._segments.append(_Segment(name, count, bad))
        self._segment_ids.append(ids)
        self._saved += count

    def _unlink_segment(self, name: str) -> None:
        for part in ("ids", "rows"):
            self._path(name, part).unlink(missing_ok=True)

    def _record(self, segments: list[_Segment], saved: int) -> None:
        record = {"format": _STAGED_FORMAT, "dim": self.dim, "count": saved,
                  "segments": [{"name": segment.name, "count": segment.count} for segment in segments]}
        text = json.dumps(record)
        write_atomically(self.progress_path, lambda temporary: temporary.write_text(text))
