"""Building index versions: staging, checkpoints, resume, publishing, and the version files.

A version is built by staging its vectors (:class:`~indexing.vector_index.StagedVectors`:
in memory, checkpointed as it goes in hidden ``.npy`` segments and a ``.progress`` record
beside its index file, so a killed job resumes) and published when complete: the index file
is written by ``faiss.write_index``, then the registry (:mod:`indexing.index_versions`)
makes it current in one transaction. A version holding NaN or infinite values is never
published. An IVF version is written as an index file and its on-disk inverted lists
(:mod:`indexing.ondisk_ivf`: trained, filled shard by shard, merged, nprobe tuned), both
complete before it is published. This module also loads version files (cached until rewritten), edits them in
place, and reconciles the original versions with the embedding store
(:meth:`IndexBuilder.sync`).

The caller (:class:`~indexing.collection.Collection`) holds the collection's write lock
around every method here that writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import select

from indexing import ondisk_ivf
from indexing.catalog import IndexState, IndexVersion, utc_now
from indexing.embedding_store import EmbeddingStore
from indexing.index_factory import AUTO, is_auto, resolve_factory
from indexing.index_versions import IndexVersionInfo, IndexVersions, same_correction
from indexing.vector_index import (
    DEFAULT_FACTORY,
    StagedVectors,
    VectorIndex,
    check_addition,
    unit_rows,
    unit_rows_into,
)
from sce_correct.errors import InputError, NotFoundError

logger = logging.getLogger(__name__)

_PUBLISH_CHUNK = 65536  # staged vectors moved at a time into a non-flat index


class IndexVersionWriter:
    """Fills one index version; obtained from :meth:`Collection.new_index_version`.

    Vectors are staged (:class:`~indexing.vector_index.StagedVectors`): a flat version's
    in-memory index, or the rows a version of another factory is filled from when published.
    ``done_ids`` are already staged (by this job, or by a killed or failed one it resumes):
    skip them. Every ``checkpoint_every`` vectors ``add`` writes the vectors added since the
    last checkpoint to disk and records them (in a background thread, while the next vectors
    are added), so a killed job resumes from there; a checkpoint writes only what is new,
    never the whole index again. None is made once every expected
    vector is staged: publishing, which follows, writes them all.
    """

    def __init__(
        self, builder: IndexBuilder, version: IndexVersionInfo, staged: StagedVectors,
        index: VectorIndex | None, checkpoint_every: int, ondisk: bool = False,
    ) -> None:
        self.builder = builder
        # an IVF version: trained at publish on a sample of the staged vectors, lists on disk
        self.ondisk = ondisk
        self.version = version
        self.staged = staged
        # the in-memory index a non-flat version is trained and filled in when published;
        # None for a flat version, whose staged vectors are its index
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
        """Train a version of a trainable in-memory factory (an on-disk IVF trains itself when
        published, on a seeded sample of its own vectors: nothing to do here)."""
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
        if self._since_checkpoint >= self.checkpoint_every and self.staged.count != self.staged.expected:
            self.checkpoint(wait=False)  # written while the next vectors are added

    def checkpoint(self, wait: bool = True) -> None:
        """Write what was staged since the last checkpoint and record it (what a killed job
        resumes from); with ``wait=False`` in the background (:meth:`wait` joins it)."""
        self.staged.checkpoint(wait=wait)
        self._since_checkpoint = 0
        self.checkpoints += 1
        self.builder.versions.set_count(self.version.name, self.staged.count)

    def wait(self) -> None:
        """Block until the last checkpoint is durable."""
        self.staged.wait()


class IndexBuilder:
    """Builds, publishes, loads and edits the index files of one collection's versions."""

    def __init__(self, versions: IndexVersions, embeddings: EmbeddingStore) -> None:
        self.versions = versions
        self.catalog = versions.catalog
        self.embeddings = embeddings
        self._index_cache: dict[str, tuple[int, VectorIndex]] = {}

    def clear_cache(self) -> None:
        self._index_cache.clear()

    # -- building a new version -------------------------------------------------------------
    @contextlib.contextmanager
    def build(
        self, *, kind: str, correction: str | None, factory: str | None, encoder: str, dim: int,
        parameters: dict[str, Any], resume: bool, checkpoint_every: int, expected_count: int | None,
    ) -> Iterator[IndexVersionWriter]:
        """The body of :meth:`Collection.new_index_version` (which documents it), lock held.

        ``factory`` None or ``auto[:budget]``: chosen by :func:`indexing.index_factory.choose_factory`
        from ``expected_count`` (else the stored vectors of ``kind``), recorded under "auto".
        """
        size = expected_count if expected_count is not None else self.embeddings.count(kind)
        factory, chosen = resolve_factory(factory, size, int(dim))
        if chosen is not None and resume:
            # The default budget follows the free memory, which changes between runs: an
            # unfinished version chosen for the same request keeps its choice and is resumed.
            earlier = self._unfinished_auto_choice(kind, correction, encoder, int(dim), chosen["requested"])
            if earlier is not None and earlier != factory:
                logger.info("resuming the %s version chosen for %s before (now it would be %s)",
                            earlier, chosen["requested"], factory)
                factory, chosen = earlier, {**chosen, "chosen": earlier}
        info = self._resume_or_create_version(
            kind, correction, factory, encoder, int(dim), parameters, resume,
            extra={"auto": chosen} if chosen else {},
        )
        self._sweep_build_files(info.file.parent)
        ondisk = factory != DEFAULT_FACTORY and ondisk_ivf.is_ondisk_factory(info.dim, factory)
        staged = self._open_staged(info, expected_count)
        index = None if factory == DEFAULT_FACTORY or ondisk else VectorIndex.create(info.dim, factory)
        writer = IndexVersionWriter(self, info, staged, index, checkpoint_every, ondisk)
        try:
            yield writer
            self._publish(info, writer)
        except Exception:
            try:  # what is staged is kept for the retry
                if writer.staged.count:
                    writer.checkpoint()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                logger.warning("could not checkpoint index version %s after the failure", info.name, exc_info=True)
            self.versions.set_state(info.name, IndexState.FAILED)
            raise
        finally:
            writer.staged.close()

    def _unfinished_auto_choice(self, kind: str, correction: str | None, encoder: str, dim: int,
                                requested: str) -> str | None:
        """The factory of the newest unfinished version built for the auto spec ``requested``."""
        with self.catalog.sessions.begin() as session:
            rows = session.scalars(
                select(IndexVersion)
                .where(IndexVersion.kind == kind, same_correction(correction), IndexVersion.encoder == encoder,
                       IndexVersion.dim == dim, IndexVersion.state.in_([IndexState.BUILDING, IndexState.FAILED]))
                .order_by(IndexVersion.id.desc())
            ).all()
            for row in rows:
                if ((row.parameters or {}).get("auto") or {}).get("requested") == requested:
                    return row.factory
        return None

    def _resume_or_create_version(
        self, kind: str, correction: str | None, factory: str, encoder: str, dim: int,
        parameters: dict[str, Any], resume: bool, extra: dict[str, Any],
    ) -> IndexVersionInfo:
        with self.catalog.sessions.begin() as session:
            if resume:
                row = session.scalar(
                    select(IndexVersion)
                    .where(
                        IndexVersion.kind == kind,
                        same_correction(correction),
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
                    row.parameters = {**(row.parameters or {}), **parameters, **extra}
                    return self.versions.info(row)
            stamp = utc_now().strftime("%Y%m%dT%H%M%S")
            name = f"{kind}-{correction or 'original'}-{stamp}-{uuid.uuid4().hex[:6]}"
            file = self.versions.index_dir / f"{name}.faiss"
            row = IndexVersion(
                name=name, kind=kind, encoder=encoder, dim=dim, correction=correction,
                factory=factory, file=self.versions.stored_file(file), count=0,
                state=IndexState.BUILDING, parameters={**parameters, **extra},
            )
            session.add(row)
            session.flush()
            return self.versions.info(row)

    def _publish(self, info: IndexVersionInfo, writer: IndexVersionWriter) -> None:
        staged, count = writer.staged, writer.staged.count
        bad = staged.bad_rows
        if bad:
            raise InputError(
                f"index version {info.name} was not published: {bad} of {count} vectors hold NaN "
                f"or infinite values (the current version stays in use)"
            )
        recorded: dict[str, Any] | None = None
        if writer.ondisk:
            # Every staged row durable first: the shards are named by row position, so a
            # resumed build may reuse one only if the rows it was made from are the same.
            writer.checkpoint()
            recorded = self._write_ondisk(info, staged)  # the file pair, complete
        elif writer.index is None:
            index = staged.as_index()  # a flat version's staged vectors are its index
            index.save(info.file)  # faiss.write_index, atomically
        else:
            index = writer.index
            for ids, rows in staged.chunks(_PUBLISH_CHUNK):
                index.add(ids, rows, check_new=False, normalize=False)
            index.save(info.file)
        # ready, and the previous version retired (one transaction)
        self.versions.publish(info.name, count, {**info.parameters, **recorded} if recorded else None)
        staged.remove()
        ondisk_ivf.remove_staging(info.file)
        _remove_build_files(info.file)
        self._index_cache.pop(info.name, None)
        logger.info("published index version %s (%d vectors)", info.name, count)

    def _write_ondisk(self, info: IndexVersionInfo, staged: StagedVectors) -> dict[str, Any]:
        """Build, tune and write an on-disk IVF version's file pair; what it records."""
        if not staged.count:
            raise InputError(f"index version {info.name} ({info.factory}) has no vectors to train on")
        index, lists_file, record = ondisk_ivf.build_ondisk(info.file, info.factory, staged)
        try:
            record.update(ondisk_ivf.tune_nprobe(index, staged))
            ondisk_ivf.commit(index, info.file, lists_file)
        finally:
            lists_file.unlink(missing_ok=True)  # renamed by commit unless it failed
        logger.info("index version %s: %s, nprobe %d (recall@10 %.3f on %d stored vectors)", info.name,
                    info.factory, record["nprobe"], record.get("tuned_recall_at_10", float("nan")),
                    record["tune_queries"])
        return {"ondisk": True, **record}

    # -- staging files of versions being built ------------------------------------------------
    @staticmethod
    def _progress_path(info: IndexVersionInfo) -> Path:
        return info.file.with_name(f".{info.file.name}.progress")

    def _open_staged(self, info: IndexVersionInfo, expected_count: int | None) -> StagedVectors:
        """The staged vectors of ``info``: resumed from its progress record, or new."""
        progress = self._progress_path(info)
        # a flat version's index is its staged vectors; other factories are filled from them
        hold, expected = info.factory == DEFAULT_FACTORY, expected_count or 0
        staged = StagedVectors.open(progress, info.dim, hold=hold, expected=expected)
        if staged is None:
            _remove_build_files(info.file)
            staged = StagedVectors.create(progress, info.dim, hold=hold, expected=expected)
            if info.file.exists():
                self._stage_index_file(info, staged)
        else:  # an on-disk build's trained index and shards stay too (made from these rows)
            _remove_build_files(info.file, keep=staged.files() | ondisk_ivf.staging_names(info.file))
        if staged.count:
            stored = self.embeddings.ids(info.kind)
            keep = np.isin(staged.ids(), stored)
            if not keep.all():
                logger.info("dropping %d staged vectors whose items are gone", int((~keep).sum()))
                staged.keep_only(keep)
                ondisk_ivf.remove_staging(info.file)  # shards of the rows as they were
            logger.info("resuming index version %s at %d vectors", info.name, staged.count)
        return staged

    def _stage_index_file(self, info: IndexVersionInfo, staged: StagedVectors) -> None:
        """Stage the vectors of an unpublished version's index file: a checkpoint in the
        former format (the whole partial index), or a file published just before a kill."""
        try:
            index = VectorIndex.load(info.file, info.factory)
            inner = None if index.ondisk else faiss.downcast_index(index.index.index)
            if not isinstance(inner, faiss.IndexFlat):
                logger.info("index version %s restarts: its %s checkpoint cannot be read back",
                            info.name, info.factory)
                return
            ids = index.ids()
            for start in range(0, len(ids), _PUBLISH_CHUNK):
                stop = min(start + _PUBLISH_CHUNK, len(ids))
                staged.append(ids[start:stop], inner.reconstruct_n(start, stop - start))
        except (RuntimeError, ValueError, OSError, NotFoundError) as error:
            logger.warning("index version %s restarts: cannot read %s: %s", info.name, info.file, error)
            return
        staged.checkpoint()

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
            if path.name.startswith(".") and ".faiss." in name and name.endswith((".npy", ".progress", ".tmp", ".partial",
                                                                                  ondisk_ivf.STAGING_SUFFIX)):
                if name.split(".faiss.", 1)[0] not in unfinished:
                    path.unlink(missing_ok=True)

    # -- version files ----------------------------------------------------------------------
    def _save_version_file(self, info: IndexVersionInfo, index: VectorIndex) -> None:
        index.save(info.file)
        self.versions.set_count(info.name, index.count)
        self._index_cache.pop(info.name, None)

    def load(self, info: IndexVersionInfo) -> VectorIndex:
        """The index of version ``info`` (cached until its file is rewritten)."""
        return self._load_version_file(info)

    def _load_version_file(self, info: IndexVersionInfo) -> VectorIndex:
        try:
            stamp = os.stat(info.file).st_mtime_ns
        except FileNotFoundError as error:
            raise NotFoundError(
                f"index file {info.file} of version {info.name!r} is missing"
            ) from error
        cached = self._index_cache.get(info.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        index = VectorIndex.load(info.file, info.factory)
        if index.dim != info.dim:
            raise InputError(
                f"index file {info.file} has dimension {index.dim}, the catalog says {info.dim}"
            )
        self._index_cache[info.name] = (stamp, index)
        return index

    @contextlib.contextmanager
    def edit(self, name: str, index: VectorIndex | None = None) -> Iterator[VectorIndex]:
        """The body of :meth:`Collection.edit_index_version` (which documents it), lock held."""
        info = self.versions.get(name)
        if index is None:
            if info.file.exists():
                index = VectorIndex.load(info.file, info.factory)
            else:
                index = VectorIndex.create(info.dim, info.factory)
        before = index.changes
        yield index
        if index.changes != before or not info.file.exists():
            self._save_version_file(info, index)

    # -- keeping versions in line with the store --------------------------------------------
    def remove_from_versions(
        self, ids: np.ndarray, keep: bool = False, kind: str | None = None,
        loaded: dict[str, VectorIndex] | None = None,
    ) -> list[tuple[str, str]]:
        """Remove ``ids`` (or, with ``keep``, every id not in ``ids``) from live versions.

        Returns (kind, factory) of original versions that cannot delete in place (HNSW):
        they are retired and must be rebuilt from the store with :meth:`sync`.
        ``loaded``: if given, the index of each ready original version is recorded in it by
        name, as it is on disk afterwards (for the caller to edit without reading it again).
        """
        to_rebuild: list[tuple[str, str]] = []
        for info in self.versions.list(kind=kind):
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
                        self.versions.set_state(info.name, IndexState.RETIRED)
                        to_rebuild.append((info.kind, info.factory))
                        continue
                    raise
                self._save_version_file(info, index)
                logger.info("removed %d ids from index version %s", len(doomed), info.name)
            if loaded is not None and info.correction is None and info.state == IndexState.READY:
                loaded[info.name] = index
        return to_rebuild

    def sync(
        self, kind: str, factory: str | None, *, encoder: str, dim: int, train_size: int, chunk_size: int,
    ) -> IndexVersionInfo:
        """The body of :meth:`Collection.sync_index` (which documents it), lock held."""
        stored_ids = self.embeddings.ids(kind)
        loaded: dict[str, VectorIndex] = {}
        self.remove_from_versions(stored_ids, keep=True, kind=kind, loaded=loaded)
        current = self.versions.current(kind)
        requested = factory
        if is_auto(factory):  # compared with the current version as the concrete string it chooses
            factory, _ = resolve_factory(factory, len(stored_ids), dim)
        rebuild = (
            current is None
            or (factory is not None and factory != current.factory)
            or current.encoder != encoder
            or not current.file.exists()
        )
        # the current version's index as remove_from_versions left it; the rest is dropped
        reused = None if rebuild or current is None else loaded.get(current.name)
        loaded.clear()
        if not rebuild:
            assert current is not None
            with self.edit(current.name, reused) as index:
                missing = np.setdiff1d(stored_ids, index.ids(), assume_unique=True)
                for ids, vectors in self.embeddings.iter_chunks(kind, chunk_size, ids=missing):
                    index.add(ids, vectors, check_new=False)
            if len(missing):
                logger.info("added %d vectors to index version %s", len(missing), current.name)
            return self.versions.get(current.name)
        # an auto spec goes to build() as given, which resolves it the same way and records why
        chosen_factory = requested if is_auto(requested) else factory or (current.factory if current else AUTO)
        with self.build(
            kind=kind, correction=None, factory=chosen_factory, encoder=encoder, dim=dim,
            parameters={}, resume=True, checkpoint_every=200_000, expected_count=len(stored_ids),
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
        return self.versions.current(kind)  # type: ignore[return-value]


def _remove_build_files(index_file: Path, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Delete the hidden staging, progress and temporary files of ``index_file`` (not ``keep``)."""
    if not index_file.parent.is_dir():
        return
    prefix = f"{index_file.name}."
    for path in index_file.parent.iterdir():
        if path.name.startswith(".") and path.name.lstrip(".").startswith(prefix) and path.name not in keep:
            path.unlink(missing_ok=True)

