"""A collection: the catalog, the stored embeddings and the FAISS index versions, kept in step.

This is the one place that writes the catalog and the index files together. The catalog and
the embedding store are the truth; an original (uncorrected) index version is derived from
the stored embeddings, so :meth:`Collection.sync_index` can always bring it back in line
(after a kill, an add or a delete) without touching an image.

Layout of a collection directory (the catalog may live elsewhere with ``db=URL``)::

    sce-collection/
        catalog.sqlite
        embeddings/<kind>/<uuid>.npy     raw encoder outputs, one file per written shard
        indexes/<version name>.faiss     unit-norm vectors under catalog ids
        indexes/.<version name>.faiss.<hex>.partial, .progress
                                         a version being built: its staged vectors and the
                                         checkpoint record a killed job resumes from

Typical use::

    collection = Collection.open("sce-collection")
    vectors = collection.embeddings.get("image", [3, 5, 8])          # stored originals
    with collection.new_index_version(correction="no-skin-tone") as writer:
        for ids, raw in collection.embeddings.iter_chunks("image"):
            writer.add(ids, transform(raw))                             # published on exit
    hits = collection.search(query_vectors, k=10, correction="no-skin-tone")
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from indexing.catalog import (
    Catalog,
    Embedding,
    EmbeddingKind,
    EmbeddingShard,
    Failure,
    IndexState,
    IndexVersion,
    Item,
    RejectReason,
    open_catalog,
    utc_now,
)
from indexing.vector_index import (
    DEFAULT_FACTORY,
    StagedVectors,
    VectorIndex,
    check_addition,
    flat_layout_matches_faiss,
    unit_rows,
    unit_rows_into,
    write_atomically,
)
from sce_correct.errors import ConflictError, NotFoundError

try:  # advisory write lock; not available on Windows, where writers are not guarded
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION_DIR = Path("sce-collection")
CATALOG_FILENAME = "catalog.sqlite"
EMBEDDINGS_DIRNAME = "embeddings"
INDEXES_DIRNAME = "indexes"
LOCK_FILENAME = ".write.lock"
# Above this many ids a lookup reads the kind's whole location table and filters in numpy
# instead of issuing many `IN (...)` queries (SQLite caps bound parameters).
_BULK_LOOKUP = 5000
_IN_CHUNK = 900
_PUBLISH_CHUNK = 65536  # staged vectors moved at a time into a non-flat index


class CollectionNotFoundError(NotFoundError, FileNotFoundError):
    """There is no collection catalog where one was expected."""


class EncoderMismatchError(ConflictError, ValueError):
    """A collection or index version was opened with an encoder other than its own."""


class CollectionBusyError(ConflictError):
    """Another process is writing to the collection."""


@dataclass(frozen=True)
class NewItem:
    """An image ready to enter the catalog (its embedding travels alongside)."""

    uri: str
    sha256: str
    width: int
    height: int
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A source file that did not become an item, and why."""

    uri: str
    reason: RejectReason
    detail: str = ""
    sha256: str | None = None
    duplicate_of: int | None = None


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    item_id: int
    uri: str
    caption: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class IndexVersionInfo:
    """A snapshot of an ``index_versions`` row with its file resolved to a path."""

    name: str
    kind: str
    encoder: str
    dim: int
    correction: str | None
    factory: str
    file: Path
    count: int
    state: str
    parameters: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ItemRecord:
    """A snapshot of an ``items`` row."""

    id: int
    uri: str
    sha256: str
    caption: str | None
    width: int
    height: int
    metadata: dict[str, Any]
    added_at: datetime


@dataclass(frozen=True)
class FailureRecord:
    uri: str
    reason: str
    detail: str
    duplicate_of: int | None


@dataclass(frozen=True)
class DeleteResult:
    deleted: list[int]
    not_found: list[int | str]


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


class EmbeddingStore:
    """Raw encoder outputs on disk, keyed by (kind, item id), written once per item.

    Each write is one ``.npy`` shard (float32 or float16), saved atomically before the
    catalog rows that point into it are committed; a shard whose rows never committed
    (a killed build) is an orphan that :meth:`remove_unreferenced_files` deletes.
    """

    def __init__(self, directory: Path, catalog: Catalog) -> None:
        self.directory = directory
        self.catalog = catalog

    def write(
        self,
        session: Session,
        kind: str,
        ids: np.ndarray | Sequence[int],
        vectors: np.ndarray,
        encoder: str,
        dtype: str = "float32",
        replace: bool = True,
    ) -> int:
        """Store ``vectors`` for ``ids`` inside the caller's transaction; returns the shard id.

        Existing vectors of the same (kind, id) are replaced (their rows re-pointed);
        ``replace=False`` skips that lookup for ids known to be new.
        """
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"expected ({len(ids)}, dim) vectors, got shape {vectors.shape}")
        relative = Path(kind) / f"{uuid.uuid4().hex}.npy"
        stored = np.ascontiguousarray(vectors, dtype=np.dtype(dtype))

        def save(temporary: Path) -> None:
            with temporary.open("wb") as handle:
                np.save(handle, stored)

        write_atomically(self.directory / relative, save)
        try:
            shard = EmbeddingShard(
                kind=kind,
                encoder=encoder,
                dim=int(vectors.shape[1]),
                dtype=stored.dtype.name,
                file=relative.as_posix(),
                count=len(ids),
            )
            session.add(shard)
            session.flush()
            for chunk in _in_chunks(ids) if replace else ():
                session.execute(
                    delete(Embedding).where(Embedding.kind == kind, Embedding.item_id.in_(chunk.tolist()))
                )
            if len(ids):
                session.execute(
                    insert(Embedding),
                    [
                        {"kind": kind, "item_id": item_id, "shard_id": shard.id, "row": row}
                        for row, item_id in enumerate(ids.tolist())
                    ],
                )
        except BaseException:
            (self.directory / relative).unlink(missing_ok=True)
            raise
        return shard.id

    def count(self, kind: str = EmbeddingKind.IMAGE) -> int:
        with self.catalog.session() as session:
            return session.scalar(
                select(func.count()).select_from(Embedding).where(Embedding.kind == kind)
            )

    def ids(self, kind: str = EmbeddingKind.IMAGE) -> np.ndarray:
        """Sorted ids that have a stored vector of this kind."""
        statement = select(Embedding.item_id).where(Embedding.kind == kind).order_by(Embedding.item_id)
        return self._int_table(statement, 1)[:, 0].copy()

    def _int_table(self, statement: Any, columns: int) -> np.ndarray:
        """An integer query result as an (n, columns) int64 array.

        Through a Core connection and ``np.fromiter``: the ORM's per-row objects cost several
        seconds for a million embedding rows.
        """
        with self.catalog.engine.connect() as connection:
            values = itertools.chain.from_iterable(connection.execute(statement))
            return np.fromiter(values, dtype=np.int64).reshape(-1, columns)

    def get(self, kind: str, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Float32 vectors for ``ids``, in that order; KeyError names ids without one."""
        wanted = np.asarray(ids, dtype=np.int64)
        item_ids, shard_ids, rows = self._locate(kind, wanted)
        found = {item_id: position for position, item_id in enumerate(item_ids.tolist())}
        missing = [item_id for item_id in wanted.tolist() if item_id not in found]
        if missing:
            raise KeyError(f"no stored {kind} embedding for ids {missing[:10]}")
        vectors = self._read(shard_ids, rows)
        order = np.fromiter((found[item_id] for item_id in wanted.tolist()), np.int64, len(wanted))
        return vectors[order]

    def iter_chunks(
        self,
        kind: str = EmbeddingKind.IMAGE,
        chunk_size: int = 65536,
        ids: np.ndarray | Sequence[int] | None = None,
        *,
        exclude: np.ndarray | Sequence[int] | None = None,
        into: Callable[[int, int], np.ndarray] | None = None,
        fill: Callable[[np.ndarray, np.ndarray], object] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) chunks of the stored vectors (all, or only ``ids``).

        Ordered by shard and row. Without ``ids`` the catalog is read a few shards at a time
        and the vectors through memory maps, so a re-index streams the store without holding
        it (or its million-row location table) in memory. ``exclude``: ids to leave out (the
        ones a resumed job already has). ``into(rows, dim)``: a float32 C-contiguous buffer
        of ``chunk_size`` rows that each chunk is copied into (a reused buffer saves a fresh
        allocation per chunk); a yielded chunk is a view of it, valid until the buffer is
        reused. Without it each chunk is a new array. ``fill(target, source)``: how rows
        are copied into that buffer (default ``np.copyto``; a re-index normalises on the way).
        """
        wanted = None if ids is None else np.asarray(ids, dtype=np.int64)
        if wanted is not None and not len(wanted):
            return
        skip = None if exclude is None or not len(exclude) else np.asarray(exclude, dtype=np.int64)
        pending_ids: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        buffer: np.ndarray | None = None
        filled = 0
        for piece_ids, piece in self._pieces(kind, wanted, skip, chunk_size):
            while len(piece_ids):
                take = min(chunk_size - filled, len(piece_ids))
                if into is not None:
                    if buffer is None:
                        buffer = into(chunk_size, piece.shape[1])
                    target, source = buffer[filled : filled + take], piece[:take]
                    if fill is None:
                        np.copyto(target, source, casting="same_kind")
                    else:
                        fill(target, source)
                else:
                    pending.append(piece[:take])
                pending_ids.append(piece_ids[:take])
                piece_ids, piece, filled = piece_ids[take:], piece[take:], filled + take
                if filled == chunk_size:
                    yield self._assemble(pending_ids, pending, buffer, filled)
                    pending_ids, pending, buffer, filled = [], [], None, 0
        if filled:
            yield self._assemble(pending_ids, pending, buffer, filled)

    @staticmethod
    def _assemble(
        pending_ids: list[np.ndarray], pending: list[np.ndarray], buffer: np.ndarray | None,
        filled: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        chunk_ids = np.concatenate(pending_ids) if len(pending_ids) > 1 else pending_ids[0].copy()
        if buffer is not None:
            return chunk_ids, buffer[:filled]
        if len(pending) == 1:
            return chunk_ids, np.array(pending[0], dtype=np.float32)
        return chunk_ids, np.concatenate(pending).astype(np.float32, copy=False)

    def _pieces(
        self, kind: str, wanted: np.ndarray | None, skip: np.ndarray | None, chunk_size: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, rows) pieces in shard and row order: memory-map slices where rows are a run."""
        for item_ids, shard_ids, rows, files in self._location_batches(kind, wanted, chunk_size):
            if skip is not None:
                keep = ~np.isin(item_ids, skip)
                item_ids, shard_ids, rows = item_ids[keep], shard_ids[keep], rows[keep]
            yield from self._shard_pieces(item_ids, shard_ids, rows, files)

    def _shard_pieces(
        self, item_ids: np.ndarray, shard_ids: np.ndarray, rows: np.ndarray, files: dict[int, str],
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, stored rows) per shard of locations sorted by shard and row: a memory-map
        slice where the rows are a run (a full scan), else the gathered rows."""
        if not len(item_ids):
            return
        boundaries = np.flatnonzero(np.diff(shard_ids)) + 1
        starts = np.r_[0, boundaries].tolist()
        stops = np.r_[boundaries, len(item_ids)].tolist()
        for start, stop in zip(starts, stops):
            stored = np.load(self.directory / files[int(shard_ids[start])], mmap_mode="r")
            shard_rows, shard_items = rows[start:stop], item_ids[start:stop]
            first, last = int(shard_rows[0]), int(shard_rows[-1])
            if last - first + 1 == len(shard_rows):  # a run of rows (a full scan): no gather
                yield shard_items, stored[first : last + 1]
            else:
                yield shard_items, stored[shard_rows]

    def _location_batches(
        self, kind: str, wanted: np.ndarray | None, chunk_size: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]]:
        """(item ids, shard ids, rows, shard files) sorted by shard and row, a few shards at a time."""
        with self.catalog.session() as session:
            shards = session.execute(
                select(EmbeddingShard.id, EmbeddingShard.file, EmbeddingShard.count)
                .where(EmbeddingShard.kind == kind)
                .order_by(EmbeddingShard.id)
            ).all()
        files = {shard_id: file for shard_id, file, _ in shards}
        if wanted is not None:
            item_ids, shard_ids, rows = self._locate(kind, wanted)
            yield item_ids, shard_ids, rows, files
            return
        batch_rows = max(chunk_size, 65536)
        group: list[int] = []
        grouped = 0
        for position, (shard_id, _, count) in enumerate(shards):
            group.append(shard_id)
            grouped += count
            if grouped < batch_rows and len(group) < _IN_CHUNK and position < len(shards) - 1:
                continue
            table = self._shard_rows(group)
            table = table[np.lexsort((table[:, 2], table[:, 1]))]
            yield table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), files
            group, grouped = [], 0

    def _shard_rows(self, shard_ids: list[int]) -> np.ndarray:
        """(item id, shard id, row) of every embedding stored in ``shard_ids``.

        By shard id alone (a shard holds one kind), so the query uses the shard index.
        """
        if self.catalog.engine.dialect.name == "sqlite":
            # One text per shard parsed by numpy: a third of the time of a million row tuples.
            statement = text(
                'SELECT shard_id, count(*), group_concat(item_id || \',\' || "row") FROM embeddings '
                "WHERE shard_id IN ({}) GROUP BY shard_id".format(",".join(str(int(i)) for i in shard_ids))
            )
            parts = []
            with self.catalog.engine.connect() as connection:
                for shard_id, count, pairs in connection.execute(statement):
                    values = np.fromstring(pairs, dtype=np.int64, sep=",")
                    if len(values) != 2 * count:
                        raise ValueError(f"unreadable embedding locations of shard {shard_id}")
                    pairs = values.reshape(-1, 2)
                    parts.append(np.column_stack([pairs[:, 0], np.full(count, shard_id), pairs[:, 1]]))
            return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
        return self._int_table(
            select(Embedding.item_id, Embedding.shard_id, Embedding.row).where(
                Embedding.shard_id.in_(shard_ids)
            ),
            3,
        )

    def sample(
        self, kind: str, size: int, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """A seeded random sample of stored (ids, vectors), e.g. to train an IVF index."""
        all_ids = self.ids(kind)
        if len(all_ids) > size:
            all_ids = np.sort(np.random.default_rng(seed).choice(all_ids, size, replace=False))
        return all_ids, self.get(kind, all_ids)

    def remove_unreferenced_files(self) -> int:
        """Delete shard files no catalog row points to (left by a killed write)."""
        with self.catalog.session() as session:
            referenced = set(session.scalars(select(EmbeddingShard.file)).all())
        removed = 0
        if not self.directory.exists():
            return 0
        for path in self.directory.rglob("*.npy"):
            if path.relative_to(self.directory).as_posix() not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        for path in self.directory.rglob(".*.tmp"):
            path.unlink(missing_ok=True)
        if removed:
            logger.info("removed %d unreferenced embedding shard files", removed)
        return removed

    def _locate(
        self, kind: str, wanted: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(item ids, shard ids, rows) sorted by shard and row, for the ``wanted`` ids."""
        columns = select(Embedding.item_id, Embedding.shard_id, Embedding.row).where(
            Embedding.kind == kind
        )
        if len(wanted) > _BULK_LOOKUP:
            table = self._int_table(columns, 3)
            table = table[np.isin(table[:, 0], wanted)]
        else:
            unique = np.unique(wanted).tolist()
            parts = [
                self._int_table(columns.where(Embedding.item_id.in_(chunk)), 3) for chunk in _in_chunks(unique)
            ]
            table = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
        table = table[np.lexsort((table[:, 2], table[:, 1]))]
        return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy()

    def _read(self, shard_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Float32 vectors at (shard, row) positions sorted by shard."""
        if not len(shard_ids):
            return np.zeros((0, 0), dtype=np.float32)
        unique_shards = np.unique(shard_ids).tolist()
        with self.catalog.session() as session:
            files = dict(
                session.execute(
                    select(EmbeddingShard.id, EmbeddingShard.file).where(
                        EmbeddingShard.id.in_(unique_shards)
                    )
                ).all()
            )
        parts = [
            # a memory-map slice is copied; gathered rows are a new array already
            np.array(piece, dtype=np.float32) if isinstance(piece, np.memmap)
            else np.asarray(piece, dtype=np.float32)
            for _, piece in self._shard_pieces(shard_ids, shard_ids, rows, files)  # (no item ids here)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class IndexVersionWriter:
    """Fills one index version; obtained from :meth:`Collection.new_index_version`.

    Vectors go straight to a staging file on disk (:class:`~indexing.vector_index.StagedVectors`),
    not into an in-memory index. ``done_ids`` are already staged (by this job, or by a killed
    or failed one it resumes): skip them. Every ``checkpoint_every`` vectors ``add`` makes
    the staged vectors durable and records how many there are, so a killed job resumes from
    there; a checkpoint writes only what is new, never the whole index again.
    """

    def __init__(
        self, collection: Collection, version: IndexVersionInfo, staged: StagedVectors,
        index: VectorIndex | None, checkpoint_every: int,
    ) -> None:
        self.collection = collection
        self.version = version
        self.staged = staged
        # the in-memory index a non-flat version is trained and filled in when published;
        # None for a flat version, whose staging file becomes the index file itself
        self.index = index
        self.checkpoint_every = max(int(checkpoint_every), 1)
        self.checkpoints = 0  # how many checkpoints this job has made durable
        self.resumed = staged.count  # vectors staged before this job started
        self._since_checkpoint = 0

    @property
    def done_ids(self) -> np.ndarray:
        return self.staged.ids()

    @property
    def count(self) -> int:
        return self.staged.count

    @property
    def needs_training(self) -> bool:
        return self.index is not None and not self.index.is_trained

    def train(self, vectors: np.ndarray) -> None:
        if self.index is not None:
            self.index.train(vectors)

    def add(
        self, ids: np.ndarray | Sequence[int], vectors: np.ndarray, check_new: bool = True,
        normalize: bool = True,
    ) -> None:
        """Stage vectors (unit-norm copies unless ``normalize=False``; see VectorIndex.add)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        rows = unit_rows(vectors) if normalize else np.ascontiguousarray(vectors, dtype=np.float32)
        if ids.ndim != 1 or rows.ndim != 2:
            raise ValueError(f"expected 1-d ids and 2-d vectors, got {ids.shape} and {rows.shape}")
        check_addition(ids, rows, self.staged.dim, self.staged.ids if check_new else None)
        if not len(ids):
            return
        self.staged.append(ids, rows)
        self._since_checkpoint += len(ids)
        if self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make everything staged durable and record it (what a killed job resumes from)."""
        self.staged.checkpoint()
        self._since_checkpoint = 0
        self.checkpoints += 1
        with self.collection.catalog.sessions.begin() as session:
            session.execute(
                update(IndexVersion)
                .where(IndexVersion.name == self.version.name)
                .values(count=self.staged.count, updated_at=utc_now())
            )


class Collection:
    """The catalog, embedding store and index versions of one collection directory."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.embeddings = EmbeddingStore(root / EMBEDDINGS_DIRNAME, catalog)
        self._lock_handle: Any = None
        self._lock_depth = 0
        self._index_cache: dict[str, tuple[int, VectorIndex]] = {}

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | Path | None = None,
        db: str | None = None,
        *,
        create: bool = False,
        index_dir: str | Path | None = None,
    ) -> Collection:
        """Open the collection in ``root`` (default ``./sce-collection``).

        ``db`` is any SQLAlchemy URL (or a path) for the catalog, by default
        ``root/catalog.sqlite``. With ``create`` a missing collection is created; otherwise
        it is a :class:`CollectionNotFoundError`. ``index_dir`` sets where new index files go
        (default ``root/indexes``); it is remembered in the catalog.
        """
        root = Path(root) if root is not None else DEFAULT_COLLECTION_DIR
        root = root.expanduser().absolute()
        target = db if db is not None else root / CATALOG_FILENAME
        try:
            catalog = open_catalog(target, create=create)
        except FileNotFoundError as error:
            raise CollectionNotFoundError(
                f"no collection at {root if db is None else db} (build one first)"
            ) from error
        collection = cls(root, catalog)
        if create:
            root.mkdir(parents=True, exist_ok=True)
        if index_dir is not None:
            with catalog.sessions.begin() as session:
                catalog.set_info(session, "index_dir", str(Path(index_dir).expanduser().absolute()))
        return collection

    def close(self) -> None:
        self._index_cache.clear()
        self.catalog.dispose()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def index_dir(self) -> Path:
        stored = self.catalog.get_info("index_dir")
        return Path(stored) if stored else self.root / INDEXES_DIRNAME

    # -- encoder ----------------------------------------------------------------------------
    @property
    def encoder_name(self) -> str | None:
        return self.catalog.get_info("encoder")

    @property
    def dim(self) -> int | None:
        value = self.catalog.get_info("dim")
        return None if value is None else int(value)

    def load_encoder(self, device: str | None = None) -> Any:
        """The collection's own encoder (``indexing.load_encoder`` of the stored spec)."""
        if self.encoder_name is None:
            raise ValueError(f"collection {self.root} has no encoder yet; build it first")
        import indexing

        return indexing.load_encoder(self.encoder_name, device=device)

    def check_encoder(self, name: str, dim: int | None = None) -> None:
        """Raise :class:`EncoderMismatchError` naming both encoders when ``name`` is not ours."""
        own, own_dim = self.encoder_name, self.dim
        if own is None:
            return
        if name != own or (dim is not None and own_dim is not None and dim != own_dim):
            raise EncoderMismatchError(
                f"collection {self.root} was built with encoder {own!r} (dim {own_dim}); "
                f"it cannot be used with encoder {name!r} (dim {dim})"
            )

    def bind_encoder(self, name: str, dim: int) -> None:
        """Record the collection's encoder on first use; afterwards check it."""
        self.check_encoder(name, dim)
        if self.encoder_name is None:
            with self.catalog.sessions.begin() as session:
                self.catalog.set_info(session, "encoder", name)
                self.catalog.set_info(session, "dim", str(int(dim)))

    # -- write lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[Collection]:
        """Hold the collection's write lock (re-entrant in this process).

        Raises :class:`CollectionBusyError` when another process holds it. The kernel
        releases the lock when its holder dies, so a killed build never blocks the next one.
        """
        if self._lock_depth == 0 and fcntl is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / LOCK_FILENAME).open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                handle.close()
                raise CollectionBusyError(
                    f"another process is writing to collection {self.root}"
                ) from error
            self._lock_handle = handle
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_handle is not None:
                fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
                self._lock_handle.close()
                self._lock_handle = None

    # -- items ------------------------------------------------------------------------------
    def add_items(
        self,
        items: Sequence[NewItem],
        embeddings: np.ndarray | None,
        rejections: Sequence[Rejection] = (),
        kind: str = EmbeddingKind.IMAGE,
        dtype: str = "float32",
    ) -> list[int]:
        """Insert items, their stored embeddings and rejections in one transaction.

        Returns the new item ids (the FAISS ids). Index files are brought in line by
        :meth:`sync_index`, not here, so a kill between batches loses nothing committed.
        """
        encoder = self.encoder_name
        if items and encoder is None:
            raise ValueError("bind an encoder to the collection before adding items")
        if items and (embeddings is None or len(embeddings) != len(items)):
            raise ValueError(f"{len(items)} items need {len(items)} embeddings")
        with self.writing(), self.catalog.sessions.begin() as session:
            new_ids: list[int] = []
            if items:
                # One executemany INSERT, then the ids by (unique) uri: far faster than an
                # ORM object or a RETURNING round trip per item on SQLite.
                session.execute(
                    insert(Item),
                    [
                        {
                            "uri": item.uri,
                            "sha256": item.sha256,
                            "caption": item.caption,
                            "width": item.width,
                            "height": item.height,
                            "metadata_": item.metadata,
                        }
                        for item in items
                    ],
                )
                uris = [item.uri for item in items]
                id_by_uri: dict[str, int] = {}
                for chunk in _in_chunks(uris):
                    rows = session.execute(select(Item.uri, Item.id).where(Item.uri.in_(chunk)))
                    id_by_uri.update((uri, item_id) for uri, item_id in rows)
                new_ids = [id_by_uri[uri] for uri in uris]
                self.embeddings.write(
                    session, kind, new_ids, embeddings, encoder, dtype, replace=False
                )
                # An item that now indexed fine is no longer a failure (retry of a fixed file).
                self._forget_failures(session, [item.uri for item in items])
            if rejections:
                self._forget_failures(session, [rejection.uri for rejection in rejections])
                session.add_all(
                    Failure(
                        uri=rejection.uri,
                        reason=str(rejection.reason),
                        detail=rejection.detail,
                        sha256=rejection.sha256,
                        duplicate_of=rejection.duplicate_of,
                    )
                    for rejection in rejections
                )
        return new_ids

    def store_embeddings(
        self, kind: str, ids: Sequence[int] | np.ndarray, vectors: np.ndarray,
        dtype: str = "float32",
    ) -> None:
        """Store (or replace) vectors of another kind, e.g. caption embeddings, for items."""
        encoder = self.encoder_name
        if encoder is None:
            raise ValueError("the collection has no encoder yet")
        with self.writing(), self.catalog.sessions.begin() as session:
            self.embeddings.write(session, kind, ids, vectors, encoder, dtype)

    @staticmethod
    def _forget_failures(session: Session, uris: list[str]) -> None:
        for chunk in _in_chunks(uris):
            session.execute(delete(Failure).where(Failure.uri.in_(chunk)))

    def known_uris(self, include_failures: bool = True) -> set[str]:
        """URIs already in the catalog (and, by default, already rejected)."""
        with self.catalog.session() as session:
            uris = set(session.scalars(select(Item.uri)).all())
            if include_failures:
                uris.update(session.scalars(select(Failure.uri)).all())
        return uris

    def find_sha256(self, digests: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Existing items by content hash: sha256 -> (item id, uri)."""
        found: dict[str, tuple[int, str]] = {}
        unique = list(dict.fromkeys(digests))
        with self.catalog.session() as session:
            for chunk in _in_chunks(unique):
                for item_id, uri, digest in session.execute(
                    select(Item.id, Item.uri, Item.sha256).where(Item.sha256.in_(chunk))
                ):
                    found.setdefault(digest, (item_id, uri))
        return found

    def item_ids(self) -> np.ndarray:
        with self.catalog.session() as session:
            return np.asarray(
                session.scalars(select(Item.id).order_by(Item.id)).all(), dtype=np.int64
            )

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        """Item snapshots by id (absent ids are left out)."""
        wanted = list(dict.fromkeys(int(item_id) for item_id in ids))
        records: dict[int, ItemRecord] = {}
        with self.catalog.session() as session:
            for chunk in _in_chunks(wanted):
                for row in session.scalars(select(Item).where(Item.id.in_(chunk))):
                    records[row.id] = _item_record(row)
        return records

    def failures(self, reason: str | None = None, limit: int | None = None) -> list[FailureRecord]:
        statement = select(Failure).order_by(Failure.id)
        if reason is not None:
            statement = statement.where(Failure.reason == reason)
        if limit is not None:
            statement = statement.limit(limit)
        with self.catalog.session() as session:
            return [
                FailureRecord(row.uri, row.reason, row.detail, row.duplicate_of)
                for row in session.scalars(statement)
            ]

    def delete(
        self, ids: Sequence[int] = (), uris: Sequence[str] = ()
    ) -> DeleteResult:
        """Delete items by id and/or URI from the catalog, the store and every index version.

        The catalog commits first: a kill before the index files are rewritten leaves them
        with extra ids, which :meth:`sync_index` removes.
        """
        with self.writing():
            with self.catalog.sessions.begin() as session:
                found: dict[int, str] = {}
                wanted_ids = [int(item_id) for item_id in ids]
                for chunk in _in_chunks(wanted_ids):
                    found.update(session.execute(select(Item.id, Item.uri).where(Item.id.in_(chunk))).all())
                wanted_uris = list(uris)
                for chunk in _in_chunks(wanted_uris):
                    found.update(session.execute(select(Item.id, Item.uri).where(Item.uri.in_(chunk))).all())
                not_found: list[int | str] = [i for i in wanted_ids if i not in found]
                found_uris = set(found.values())
                not_found += [uri for uri in wanted_uris if uri not in found_uris]
                doomed = sorted(found)
                for chunk in _in_chunks(doomed):
                    session.execute(delete(Embedding).where(Embedding.item_id.in_(chunk)))
                    session.execute(delete(Item).where(Item.id.in_(chunk)))
            if doomed:
                for kind, factory in self._remove_from_versions(np.asarray(doomed, dtype=np.int64)):
                    self.sync_index(kind, factory)
        logger.info("deleted %d items", len(doomed))
        return DeleteResult(deleted=doomed, not_found=not_found)

    # -- index versions ---------------------------------------------------------------------
    def versions(
        self, kind: str | None = None, include_retired: bool = False
    ) -> list[IndexVersionInfo]:
        statement = select(IndexVersion).order_by(IndexVersion.id)
        if kind is not None:
            statement = statement.where(IndexVersion.kind == kind)
        if not include_retired:
            statement = statement.where(IndexVersion.state != IndexState.RETIRED)
        with self.catalog.session() as session:
            return [self._version_info(row) for row in session.scalars(statement)]

    def version(self, name: str) -> IndexVersionInfo:
        with self.catalog.session() as session:
            row = session.scalar(select(IndexVersion).where(IndexVersion.name == name))
            if row is None:
                raise KeyError(f"no index version named {name!r}")
            return self._version_info(row)

    def current_version(
        self, kind: str = EmbeddingKind.IMAGE, correction: str | None = None
    ) -> IndexVersionInfo | None:
        """The newest ready version for (kind, correction), or None."""
        with self.catalog.session() as session:
            row = session.scalar(
                select(IndexVersion)
                .where(
                    IndexVersion.kind == kind,
                    _same_correction(correction),
                    IndexVersion.state == IndexState.READY,
                )
                .order_by(IndexVersion.id.desc())
                .limit(1)
            )
            return None if row is None else self._version_info(row)

    def open_index(
        self,
        version: str | IndexVersionInfo | None = None,
        *,
        kind: str = EmbeddingKind.IMAGE,
        correction: str | None = None,
        encoder: str | None = None,
    ) -> tuple[IndexVersionInfo, VectorIndex]:
        """Load an index version (by name, or the current one for kind/correction).

        ``encoder``: the caller's encoder name; another encoder than the version's is an
        :class:`EncoderMismatchError` naming both. Loaded files are cached until rewritten.
        """
        info = self._resolve_version(version, kind, correction)
        if encoder is not None and encoder != info.encoder:
            raise EncoderMismatchError(
                f"index version {info.name!r} was built with encoder {info.encoder!r} "
                f"(dim {info.dim}); it cannot be searched with encoder {encoder!r}"
            )
        return info, self._load_version_file(info)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        version: str | IndexVersionInfo | None = None,
        kind: str = EmbeddingKind.IMAGE,
        correction: str | None = None,
        encoder: str | None = None,
        nprobe: int | None = None,
    ) -> list[list[SearchHit]]:
        """Top-k items per query vector (cosine), joined with their catalog rows."""
        _, index = self.open_index(version, kind=kind, correction=correction, encoder=encoder)
        if nprobe is not None:
            index.set_nprobe(nprobe)
        scores, ids = index.search(np.atleast_2d(queries), k)
        records = self.items(ids[ids >= 0])
        results = []
        for query_scores, query_ids in zip(scores, ids):
            hits = []
            for score, item_id in zip(query_scores.tolist(), query_ids.tolist()):
                record = records.get(item_id)
                if record is None:  # an empty slot (-1), or deleted since the file was read
                    continue
                hits.append(
                    SearchHit(len(hits) + 1, score, item_id, record.uri, record.caption, record.metadata)
                )
            results.append(hits)
        return results

    @contextlib.contextmanager
    def new_index_version(
        self,
        *,
        kind: str = EmbeddingKind.IMAGE,
        correction: str | None = None,
        factory: str | None = None,
        dim: int | None = None,
        parameters: dict[str, Any] | None = None,
        resume: bool = True,
        checkpoint_every: int = 200_000,
        expected_count: int | None = None,
    ) -> Iterator[IndexVersionWriter]:
        """Build a new index version and publish it atomically when the block ends.

        Inside the block the version is ``building`` and searches keep using the current
        one; added vectors are staged on disk beside the index file (hidden ``.partial`` and
        ``.progress`` files). On success the index file is completed (a flat index: the
        staging file itself, fsync'ed and renamed; others: built from it and saved
        atomically), the version becomes ``ready`` and the previous ready version of the
        same (kind, correction) is ``retired`` in one transaction, and the staging files are
        removed. On an exception it is ``failed``. With ``resume`` an unfinished version of
        the same kind, correction, factory, encoder and dimension is continued from its last
        checkpoint (``writer.done_ids``); staged ids that lost their stored embedding since
        are dropped. ``expected_count``: how many vectors will be added (sizes the staging
        file; it grows when more come).
        """
        encoder = self.encoder_name
        dim = dim if dim is not None else self.dim
        if encoder is None or dim is None:
            raise ValueError("the collection has no encoder yet; build it first")
        factory = factory or DEFAULT_FACTORY
        with self.writing():
            info = self._resume_or_create_version(
                kind, correction, factory, encoder, int(dim), parameters or {}, resume
            )
            self._sweep_build_files(info.file.parent)
            staged = self._open_staged(info, expected_count)
            index = None if factory == DEFAULT_FACTORY else VectorIndex.create(info.dim, factory)
            writer = IndexVersionWriter(self, info, staged, index, checkpoint_every)
            try:
                yield writer
                self._publish(info, writer)
            except Exception:
                self._set_state(info.name, IndexState.FAILED)
                raise
            finally:
                writer.staged.close()

    @contextlib.contextmanager
    def edit_index_version(self, name: str, index: VectorIndex | None = None) -> Iterator[VectorIndex]:
        """Change an existing version in place (add or remove vectors); saved atomically on exit.

        ``index``: the version's file already loaded (as it is on disk), so it is not read again.
        """
        with self.writing():
            info = self.version(name)
            if index is None:
                if info.file.exists():
                    index = VectorIndex.load(info.file, info.factory)
                else:
                    index = VectorIndex.create(info.dim, info.factory)
            before = index.changes
            yield index
            if index.changes != before or not info.file.exists():
                self._save_version_file(info, index)

    def sync_index(
        self,
        kind: str = EmbeddingKind.IMAGE,
        factory: str | None = None,
        *,
        train_size: int = 100_000,
        chunk_size: int = 65536,
    ) -> IndexVersionInfo:
        """Make the original index of ``kind`` hold exactly the stored embeddings.

        Adds stored vectors missing from it, removes ids no longer in the catalog (from the
        corrected versions too), and builds a new version when there is none yet or when
        ``factory`` differs from the current one's. Returns the current original version.
        """
        with self.writing():
            stored_ids = self.embeddings.ids(kind)
            loaded: dict[str, VectorIndex] = {}
            self._remove_from_versions(stored_ids, keep=True, kind=kind, loaded=loaded)
            current = self.current_version(kind)
            rebuild = (
                current is None
                or (factory is not None and factory != current.factory)
                or current.encoder != self.encoder_name
                or not current.file.exists()
            )
            # the current version's index as _remove_from_versions left it; the rest is dropped
            reused = None if rebuild or current is None else loaded.get(current.name)
            loaded.clear()
            if not rebuild:
                assert current is not None
                with self.edit_index_version(current.name, reused) as index:
                    missing = np.setdiff1d(stored_ids, index.ids(), assume_unique=True)
                    for ids, vectors in self.embeddings.iter_chunks(kind, chunk_size, ids=missing):
                        index.add(ids, vectors, check_new=False)
                if len(missing):
                    logger.info("added %d vectors to index version %s", len(missing), current.name)
                return self.version(current.name)
            chosen_factory = factory or (current.factory if current else DEFAULT_FACTORY)
            with self.new_index_version(
                kind=kind, factory=chosen_factory, expected_count=len(stored_ids)
            ) as writer:
                if writer.needs_training:
                    _, sample = self.embeddings.sample(kind, train_size)
                    writer.train(sample)
                done = writer.done_ids
                buffer: list[np.ndarray] = []  # one chunk buffer, reused: add() stages a chunk at once

                def reuse(rows: int, dim: int) -> np.ndarray:
                    if not buffer:
                        buffer.append(np.empty((rows, dim), dtype=np.float32))
                    return buffer[0]

                # unit rows already (normalised while copied into the buffer, as a re-index does)
                for ids, vectors in self.embeddings.iter_chunks(
                    kind, chunk_size, exclude=done, into=reuse, fill=unit_rows_into
                ):
                    writer.add(ids, vectors, check_new=False, normalize=False)
            return self.current_version(kind)  # type: ignore[return-value]

    def remove_retired_files(self) -> int:
        """Delete the files of retired versions (after readers have moved on)."""
        removed = 0
        for info in self.versions(include_retired=True):
            if info.state == IndexState.RETIRED and info.file.exists():
                info.file.unlink()
                removed += 1
        return removed

    # -- overview ---------------------------------------------------------------------------
    def info(self) -> CollectionInfo:
        with self.catalog.session() as session:
            items = session.scalar(select(func.count()).select_from(Item))
            embeddings = dict(
                session.execute(select(Embedding.kind, func.count()).group_by(Embedding.kind)).all()
            )
            failures = dict(
                session.execute(select(Failure.reason, func.count()).group_by(Failure.reason)).all()
            )
        return CollectionInfo(
            root=self.root,
            catalog_url=self.catalog.url,
            encoder=self.encoder_name,
            dim=self.dim,
            items=items,
            embeddings=embeddings,
            failures=failures,
            versions=self.versions(include_retired=True),
        )

    # -- internals --------------------------------------------------------------------------
    def _version_info(self, row: IndexVersion) -> IndexVersionInfo:
        file = Path(row.file)
        if not file.is_absolute():
            file = self.root / file
        return IndexVersionInfo(
            name=row.name, kind=row.kind, encoder=row.encoder, dim=row.dim,
            correction=row.correction, factory=row.factory, file=file, count=row.count,
            state=row.state, parameters=dict(row.parameters or {}), created_at=row.created_at,
        )

    def _resolve_version(
        self, version: str | IndexVersionInfo | None, kind: str, correction: str | None
    ) -> IndexVersionInfo:
        if isinstance(version, IndexVersionInfo):
            return version
        if version is not None:
            return self.version(version)
        info = self.current_version(kind, correction)
        if info is None:
            what = f"{kind} index" + (f" with correction {correction!r}" if correction else "")
            raise LookupError(f"collection {self.root} has no ready {what}")
        return info

    def _resume_or_create_version(
        self, kind: str, correction: str | None, factory: str, encoder: str, dim: int,
        parameters: dict[str, Any], resume: bool,
    ) -> IndexVersionInfo:
        with self.catalog.sessions.begin() as session:
            if resume:
                row = session.scalar(
                    select(IndexVersion)
                    .where(
                        IndexVersion.kind == kind,
                        _same_correction(correction),
                        IndexVersion.factory == factory,
                        IndexVersion.encoder == encoder,
                        IndexVersion.dim == dim,
                        IndexVersion.state.in_([IndexState.BUILDING, IndexState.FAILED]),
                    )
                    .order_by(IndexVersion.id.desc())
                    .limit(1)
                )
                recorded = (row.parameters or {}) if row is not None else {}
                if correction is not None and any(key in recorded and recorded[key] != value
                                                  for key, value in parameters.items()):
                    # Another fit of the correction (or other options) than the unfinished job's:
                    # start afresh; retired, its staging files are swept below.
                    logger.info("not resuming index version %s: it was started with other correction "
                                "parameters", row.name)
                    row.state = IndexState.RETIRED
                    row = None
                if row is not None:
                    row.state = IndexState.BUILDING
                    row.parameters = parameters or row.parameters
                    return self._version_info(row)
            stamp = utc_now().strftime("%Y%m%dT%H%M%S")
            name = f"{kind}-{correction or 'original'}-{stamp}-{uuid.uuid4().hex[:6]}"
            file = self.index_dir / f"{name}.faiss"
            try:
                stored_file = file.relative_to(self.root).as_posix()
            except ValueError:
                stored_file = str(file)
            row = IndexVersion(
                name=name, kind=kind, encoder=encoder, dim=dim, correction=correction,
                factory=factory, file=stored_file, count=0, state=IndexState.BUILDING,
                parameters=parameters,
            )
            session.add(row)
            session.flush()
            return self._version_info(row)

    def _publish(self, info: IndexVersionInfo, writer: IndexVersionWriter) -> None:
        staged, count = writer.staged, writer.staged.count
        if writer.index is None and flat_layout_matches_faiss(info.dim):
            staged.publish_flat(info.file)  # the staged vectors are the index file's
        else:
            index = writer.index or VectorIndex.create(info.dim, info.factory)
            ids = staged.ids()
            for start in range(0, count, _PUBLISH_CHUNK):
                stop = start + _PUBLISH_CHUNK
                index.add(ids[start:stop], staged.rows(start, stop), check_new=False, normalize=False)
            index.save(info.file)
        with self.catalog.sessions.begin() as session:
            session.execute(
                update(IndexVersion)
                .where(
                    IndexVersion.kind == info.kind,
                    _same_correction(info.correction),
                    IndexVersion.state == IndexState.READY,
                    IndexVersion.name != info.name,
                )
                .values(state=IndexState.RETIRED, updated_at=utc_now())
            )
            session.execute(
                update(IndexVersion)
                .where(IndexVersion.name == info.name)
                .values(state=IndexState.READY, count=count, updated_at=utc_now())
            )
        staged.remove()
        _remove_build_files(info.file)
        self._index_cache.pop(info.name, None)
        logger.info("published index version %s (%d vectors)", info.name, count)

    # -- staging files of versions being built ------------------------------------------------
    @staticmethod
    def _progress_path(info: IndexVersionInfo) -> Path:
        return info.file.with_name(f".{info.file.name}.progress")

    def _open_staged(self, info: IndexVersionInfo, expected_count: int | None) -> StagedVectors:
        """The staged vectors of ``info``: resumed from its progress record, or new."""
        progress = self._progress_path(info)
        staged = StagedVectors.open(progress, info.dim)
        if staged is None:
            _remove_build_files(info.file)
            staged = StagedVectors.create(progress, info.dim, capacity=expected_count or 1024)
            if info.file.exists():
                self._stage_index_file(info, staged)
        else:
            _remove_build_files(info.file, keep={staged.file.name, progress.name})
        if staged.count:
            stored = self.embeddings.ids(info.kind)
            keep = np.isin(staged.ids(), stored)
            if not keep.all():
                logger.info("dropping %d staged vectors whose items are gone", int((~keep).sum()))
                staged = self._restage(staged, keep)
            logger.info("resuming index version %s at %d vectors", info.name, staged.count)
        return staged

    def _stage_index_file(self, info: IndexVersionInfo, staged: StagedVectors) -> None:
        """Stage the vectors of an unpublished version's index file: a checkpoint in the
        former format (the whole partial index), or a file published just before a kill."""
        try:
            index = VectorIndex.load(info.file, info.factory)
            inner = faiss.downcast_index(index.index.index)
            if not isinstance(inner, faiss.IndexFlat):
                logger.info("index version %s restarts: its %s checkpoint cannot be read back",
                            info.name, info.factory)
                return
            ids = index.ids()
            for start in range(0, len(ids), _PUBLISH_CHUNK):
                stop = min(start + _PUBLISH_CHUNK, len(ids))
                staged.append(ids[start:stop], inner.reconstruct_n(start, stop - start))
        except (RuntimeError, ValueError, OSError) as error:
            logger.warning("index version %s restarts: cannot read %s: %s", info.name, info.file, error)
            return
        staged.checkpoint()

    @staticmethod
    def _restage(staged: StagedVectors, keep: np.ndarray) -> StagedVectors:
        """New staged vectors holding only the ``keep`` rows; replaces ``staged`` atomically."""
        fresh = StagedVectors.create(staged.progress_path, staged.dim, capacity=max(int(keep.sum()), 1))
        ids = staged.ids()
        for start in range(0, staged.count, _PUBLISH_CHUNK):
            stop = min(start + _PUBLISH_CHUNK, staged.count)
            mask = keep[start:stop]
            if mask.any():
                fresh.append(ids[start:stop][mask], np.ascontiguousarray(staged.rows(start, stop)[mask]))
        fresh.checkpoint()  # the progress record now names the new file
        staged.close()
        staged.file.unlink(missing_ok=True)
        return fresh

    def _sweep_build_files(self, directory: Path) -> None:
        """Delete staging files left by versions that are no longer being built (a kill
        between publishing a version and removing its staging files)."""
        if not directory.is_dir():
            return
        with self.catalog.session() as session:
            unfinished = set(session.scalars(
                select(IndexVersion.name).where(
                    IndexVersion.state.in_([IndexState.BUILDING, IndexState.FAILED])
                )
            ))
        for path in directory.iterdir():
            name = path.name.lstrip(".")
            if path.name.startswith(".") and ".faiss." in name and name.endswith((".partial", ".progress", ".tmp")):
                if name.split(".faiss.", 1)[0] not in unfinished:
                    path.unlink(missing_ok=True)

    def _save_version_file(self, info: IndexVersionInfo, index: VectorIndex) -> None:
        index.save(info.file)
        with self.catalog.sessions.begin() as session:
            session.execute(
                update(IndexVersion)
                .where(IndexVersion.name == info.name)
                .values(count=index.count, updated_at=utc_now())
            )
        self._index_cache.pop(info.name, None)

    def _set_state(self, name: str, state: IndexState) -> None:
        with self.catalog.sessions.begin() as session:
            session.execute(
                update(IndexVersion).where(IndexVersion.name == name).values(state=state, updated_at=utc_now())
            )

    def _load_version_file(self, info: IndexVersionInfo) -> VectorIndex:
        try:
            stamp = os.stat(info.file).st_mtime_ns
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"index file {info.file} of version {info.name!r} is missing"
            ) from error
        cached = self._index_cache.get(info.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        index = VectorIndex.load(info.file, info.factory)
        if index.dim != info.dim:
            raise ValueError(
                f"index file {info.file} has dimension {index.dim}, the catalog says {info.dim}"
            )
        self._index_cache[info.name] = (stamp, index)
        return index

    def _remove_from_versions(
        self, ids: np.ndarray, keep: bool = False, kind: str | None = None,
        loaded: dict[str, VectorIndex] | None = None,
    ) -> list[tuple[str, str]]:
        """Remove ``ids`` (or, with ``keep``, every id not in ``ids``) from live versions.

        Returns (kind, factory) of original versions that cannot delete in place (HNSW):
        they are retired and must be rebuilt from the store with :meth:`sync_index`.
        ``loaded``: if given, the index of each ready original version is recorded in it by
        name, as it is on disk afterwards (for the caller to edit without reading it again).
        """
        to_rebuild: list[tuple[str, str]] = []
        for info in self.versions(kind=kind):
            if not info.file.exists():
                continue
            index = VectorIndex.load(info.file, info.factory)
            present = index.ids()
            doomed = (
                np.setdiff1d(present, ids) if keep else np.intersect1d(present, ids)
            )
            if len(doomed):
                try:
                    index.remove(doomed)
                except NotImplementedError:
                    if info.correction is None and info.state == IndexState.READY:
                        logger.warning("%s cannot delete in place; rebuilding it", info.name)
                        self._set_state(info.name, IndexState.RETIRED)
                        to_rebuild.append((info.kind, info.factory))
                        continue
                    raise
                self._save_version_file(info, index)
                logger.info("removed %d ids from index version %s", len(doomed), info.name)
            if loaded is not None and info.correction is None and info.state == IndexState.READY:
                loaded[info.name] = index
        return to_rebuild


def _in_chunks(values: Sequence[Any] | np.ndarray) -> Iterator[Any]:
    """``values`` in slices of at most ``_IN_CHUNK`` (SQLite caps a query's bound parameters)."""
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _same_correction(correction: str | None) -> Any:
    """The condition that an index version has ``correction`` (None: an original version)."""
    return IndexVersion.correction.is_(None) if correction is None else IndexVersion.correction == correction


def _remove_build_files(index_file: Path, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Delete the hidden staging, progress and temporary files of ``index_file`` (not ``keep``)."""
    if not index_file.parent.is_dir():
        return
    prefix = f"{index_file.name}."
    for path in index_file.parent.iterdir():
        if path.name.startswith(".") and path.name.lstrip(".").startswith(prefix) and path.name not in keep:
            path.unlink(missing_ok=True)


def _item_record(row: Item) -> ItemRecord:
    return ItemRecord(
        id=row.id, uri=row.uri, sha256=row.sha256, caption=row.caption, width=row.width,
        height=row.height, metadata=dict(row.metadata_ or {}), added_at=row.added_at,
    )
