"""The stored encoder outputs of a collection: raw vectors by (kind, item id), in ``.npy`` shards.

Layout: ``<collection>/embeddings/<kind>/<uuid>.npy``, one file per write, located by the
catalog's ``embedding_shards`` (one row per file) and ``embeddings`` (one row per item: shard
and row) tables. The store is the truth an original index version is rebuilt from.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.orm import Session

from indexing.atomic import write_atomically
from indexing.catalog import IN_CHUNK, Catalog, Embedding, EmbeddingKind, EmbeddingShard, in_chunks
from sce_correct.errors import InputError, NotFoundError

logger = logging.getLogger(__name__)


class EmbeddingNotFoundError(NotFoundError, KeyError):
    """Some of the items asked for have no stored vector of that kind."""


# Above this many ids a lookup reads the kind's whole location table and filters in numpy
# instead of issuing many `IN (...)` queries (SQLite caps bound parameters).
_BULK_LOOKUP = 5000


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
            for chunk in in_chunks(ids) if replace else ():
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

    def counts(self) -> dict[str, int]:
        """How many vectors are stored, by kind."""
        with self.catalog.session() as session:
            return dict(
                session.execute(select(Embedding.kind, func.count()).group_by(Embedding.kind)).all()
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
            raise EmbeddingNotFoundError(f"no stored {kind} embedding for ids {missing[:10]}")
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
            path = self.directory / files[int(shard_ids[start])]
            try:
                stored = np.load(path, mmap_mode="r")
            except (ValueError, EOFError) as error:  # truncated, overwritten: not an .npy array
                raise InputError(f"{path}: damaged embedding file ({error}); restore the collection "
                                 "from a backup or build it again") from error
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
            if grouped < batch_rows and len(group) < IN_CHUNK and position < len(shards) - 1:
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
                    try:  # numpy 2.4 raises on text it cannot parse; older ones warned and stopped short
                        values = np.fromstring(pairs or "", dtype=np.int64, sep=",")
                    except ValueError:
                        values = np.zeros(0, dtype=np.int64)
                    if len(values) != 2 * count:
                        raise InputError(f"{self.catalog.url}: damaged catalog: unreadable embedding "
                                         f"locations of shard {shard_id}")
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
                self._int_table(columns.where(Embedding.item_id.in_(chunk)), 3) for chunk in in_chunks(unique)
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
