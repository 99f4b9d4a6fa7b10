"""A collection: the catalog, the stored embeddings and the FAISS index versions, kept in step.

:class:`Collection` is a thin facade over the parts that do the work, each one job:

- :mod:`indexing.items`: items and rejected files (and metadata filters in SQL);
- :mod:`indexing.embedding_store`: the stored encoder outputs;
- :mod:`indexing.index_versions`: the registry of index versions and the retention rule;
- :mod:`indexing.index_build`: building, checkpointing, resuming and publishing versions;
- :mod:`indexing.collection_types`: the value types and errors (imported here).

Here live what ties them together: opening (and safely creating) a collection, its encoder,
the write lock, and the operations that touch several parts at once (adding and deleting
items, searching joined to the catalog). The catalog and the embedding store are the truth;
an original (uncorrected) index version is derived from the stored embeddings, so
:meth:`Collection.sync_index` can always bring it back in line (after a kill, an add or a
delete) without touching an image.

Layout of a collection directory (the catalog may live elsewhere with ``db=URL``)::

    sce-collection/
        catalog.sqlite
        embeddings/<kind>/<uuid>.npy     raw encoder outputs, one file per written shard
        indexes/<version name>.faiss     unit-norm vectors under catalog ids
        indexes/.<version name>.faiss.<hex>.{ids,rows}.npy, .progress
                                         a version being built: its checkpoint segments and
                                         the record a killed job resumes from

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
import logging
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock, Timeout
from sqlalchemy.exc import SQLAlchemyError

from indexing.catalog import Catalog, CatalogInfo, EmbeddingKind, open_catalog, shown_url
from indexing.collection_types import (CollectionBusyError, CollectionInfo, CollectionNotFoundError,
                                       EncoderMismatchError, SearchHit)
from indexing.embedding_store import EmbeddingStore
from indexing.index_build import IndexBuilder, IndexVersionWriter
from indexing.index_versions import (
    INDEXES_DIRNAME,
    GarbageReport,
    IndexVersionInfo,
    IndexVersions,
)
from indexing.items import (
    DeleteResult,
    FailureRecord,
    ItemRecord,
    ItemStore,
    NewItem,
    Rejection,
)
from indexing.vector_index import VectorIndex
from sce_correct.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from indexing.correction_store import CorrectionRegistry

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION_DIR = Path("sce-collection")
CATALOG_FILENAME = "catalog.sqlite"
EMBEDDINGS_DIRNAME = "embeddings"
LOCK_FILENAME = ".write.lock"
#: Taken while a catalog is created, and removed by its holder before it lets go (see
#: :func:`_create_or_open_catalog`), so it is not left in the folder.
CREATE_LOCK_FILENAME = ".create.lock"
#: How long opening waits for another process that is creating the same collection.
CREATE_WAIT_SECONDS = 60.0
#: Catalog info key of the bound encoder's ``weights_id`` (:meth:`Collection.bind_encoder`).
WEIGHTS_KEY = "encoder_weights"

__all__ = [
    "Collection", "CollectionInfo", "CollectionNotFoundError", "EncoderMismatchError",
    "CollectionBusyError", "SearchHit", "NewItem", "Rejection", "ItemRecord", "FailureRecord",
    "DeleteResult", "IndexVersionInfo", "IndexVersionWriter", "GarbageReport",
    "DEFAULT_COLLECTION_DIR", "INDEXES_DIRNAME",
]


class Collection:
    """The catalog, embedding store and index versions of one collection directory."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.items_store = ItemStore(catalog)
        self.embeddings = EmbeddingStore(root / EMBEDDINGS_DIRNAME, catalog)
        self.index_versions = IndexVersions(root, catalog)
        self.builder = IndexBuilder(self.index_versions, self.embeddings)
        # process-wide (not per thread) and re-entrant: nested writing() blocks share it
        self._lock = FileLock(root / LOCK_FILENAME, timeout=0, thread_local=False)
        self._catalog_lock = catalog.writer_lock()
        self._lock_guard = threading.Lock()  # threads of this process share both locks
        self._corrections: CorrectionRegistry | None = None
        #: The topmost folder that ``open(create=True)`` made for this collection (None: it existed).
        self.created_folder: Path | None = None

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
        ``root/catalog.sqlite``. With ``create`` a missing collection is created (several
        processes may do so at once: they take turns, and all open the same catalog);
        otherwise it is a :class:`CollectionNotFoundError`. ``index_dir`` sets where new
        index files go (default ``root/indexes``); it is remembered in the catalog.
        """
        root = Path(root) if root is not None else DEFAULT_COLLECTION_DIR
        root = root.expanduser().absolute()
        target = db if db is not None else root / CATALOG_FILENAME
        if root.exists() and not root.is_dir():  # not "no collection at" nor "File exists"
            raise InputError(f"collection {root} is a file, not a folder")
        index_folder = Path(index_dir).expanduser().absolute() if index_dir is not None else None
        if index_folder is not None and index_folder.exists() and not index_folder.is_dir():
            raise InputError(f"index folder {index_folder} is a file, not a folder")
        created: Path | None = None
        try:
            if create:
                catalog, created = _create_or_open_catalog(root, target)
            else:
                catalog = open_catalog(target, create=False)
        except FileNotFoundError as error:
            raise CollectionNotFoundError(
                f"no collection at {root if db is None else shown_url(db)} (build one first)"
            ) from error
        collection = cls(root, catalog)
        collection.created_folder = created
        if index_dir is not None:
            with catalog.sessions.begin() as session:
                catalog.set_info(session, "index_dir", str(index_folder))
        return collection

    def close(self) -> None:
        self.builder.clear_cache()
        self.catalog.dispose()

    def discard_if_unused(self) -> bool:
        """Close, and delete the folder ``open(create=True)`` made, if nothing was committed to it.

        Undoes a first build that failed before it stored an item or a rejected file, so that a
        refused build of a new collection leaves nothing behind. Not when another process holds
        the write lock (it is using the collection), nor when the folder existed before. A
        catalog kept elsewhere (``db=URL``) is not touched. Returns whether it deleted the folder.
        """
        folder = self.created_folder
        try:
            if folder is None or self.items_store.count() or self.items_store.failure_counts():
                return False
            with self.writing():
                self.close()
                shutil.rmtree(folder, ignore_errors=True)
        except (CollectionBusyError, SQLAlchemyError, OSError) as error:  # keep it; the first error is the news
            logger.debug("kept %s: %s", folder, error)
            return False
        finally:
            self.close()
        logger.debug("removed %s: the build that created it failed before storing anything", folder)
        return True

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def index_dir(self) -> Path:
        return self.index_versions.index_dir

    @property
    def corrections(self) -> CorrectionRegistry:
        """The fitted corrections (:mod:`indexing.correction_store`; imported when first used)."""
        if self._corrections is None:
            from indexing.correction_store import CORRECTIONS_DIRNAME, CorrectionRegistry

            self._corrections = CorrectionRegistry(self.catalog, self.root / CORRECTIONS_DIRNAME)
        return self._corrections

    # -- encoder ----------------------------------------------------------------------------
    @property
    def encoder_name(self) -> str | None:
        return self.catalog.get_info("encoder")

    @property
    def encoder_weights(self) -> str | None:
        """The weights id recorded when the collection was bound (None: unknown)."""
        return self.catalog.get_info(WEIGHTS_KEY)

    @property
    def dim(self) -> int | None:
        value = self.catalog.get_info("dim")
        return None if value is None else int(value)

    def load_encoder(self, device: str | None = None) -> Any:
        """The collection's own encoder (``indexing.load_encoder`` of the stored spec); logs a
        warning naming both weights ids when they differ (:meth:`check_writer` refuses writes)."""
        if self.encoder_name is None:
            raise InputError(f"collection {self.root} has no encoder yet; build it first")
        import indexing

        encoder = indexing.load_encoder(self.encoder_name, device=device)
        if (mismatch := self._weights_mismatch(encoder)) is not None:
            logger.warning("%s: its queries are compared with embeddings of the recorded weights", mismatch)
        return encoder

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

    def check_writer(self, encoder: Any) -> None:
        """The one check before ``encoder`` writes image embeddings here (build, add, a re-index
        that re-encodes): :meth:`check_encoder`, then :class:`EncoderMismatchError` when its
        ``weights_id`` is not the recorded one. Unknown on either side is accepted."""
        self.check_encoder(encoder.name, encoder.dim)
        if (mismatch := self._weights_mismatch(encoder)) is not None:
            raise EncoderMismatchError(f"{mismatch}: its image embeddings would mix with the stored ones; "
                                       f"build a new collection with it (sce index build SOURCE -c NEW "
                                       f"--encoder {encoder.name}) or use the weights this one was built with")

    def _weights_mismatch(self, encoder: Any) -> str | None:
        recorded, current = self.encoder_weights, getattr(encoder, "weights_id", None)
        if recorded is None or current is None or recorded == current:
            return None
        return f"collection {self.root} was built with {encoder.name!r} weights {recorded}; this one has {current}"

    def bind_encoder(self, name: str, dim: int, weights_id: str | None = None) -> None:
        """Record the collection's encoder on first use; afterwards check it. ``weights_id`` is
        recorded (as ``encoder_weights``) only then: a collection bound before weights ids were
        recorded, or without one, keeps none (unknown: no guess of what made its embeddings)."""
        self.check_encoder(name, dim)
        if self.encoder_name is None:
            values = {"encoder": name, "dim": str(int(dim)), WEIGHTS_KEY: weights_id}
            try:
                with self.catalog.sessions.begin() as session:  # inserts: never overwrites
                    session.add_all([CatalogInfo(key=k, value=v) for k, v in values.items() if v is not None])
            except SQLAlchemyError:
                if self.encoder_name is None:
                    raise
                # another process bound an encoder at the same moment: it must be this one
            self.check_encoder(name, dim)

    # -- write lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[Collection]:
        """Hold the collection's write lock (re-entrant in this process).

        Raises :class:`CollectionBusyError` when another process holds it: the lock file, or
        on PostgreSQL the catalog's :class:`~indexing.catalog.WriterLock` (writers on several
        machines). Both go when their holder dies, so a killed build never blocks the next one.
        """
        if not self._lock.is_locked:
            self.root.mkdir(parents=True, exist_ok=True)
        with self._lock_guard:
            try:
                self._lock.acquire(timeout=0)
            except Timeout as error:
                raise CollectionBusyError(f"another process is writing to collection {self.root}") from error
            # and the catalog's own lock (PostgreSQL: writers on other machines, whose lock
            # files need not see this one), held while the lock file is
            held = False
            try:
                held = self._lock.lock_counter > 1 or self._catalog_lock.acquire()
            finally:
                if not held:  # refused, or the database failed: let go of the lock file too
                    self._lock.release()
            if not held:
                raise CollectionBusyError(f"another process is writing to collection {self.root} "
                                          f"(catalog {self.catalog.url})")
        try:
            yield self
        finally:
            with self._lock_guard:
                if self._lock.lock_counter == 1:
                    self._catalog_lock.release()
                self._lock.release()

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
            raise InputError("bind an encoder to the collection before adding items")
        if items and (embeddings is None or len(embeddings) != len(items)):
            raise InputError(f"{len(items)} items need {len(items)} embeddings")
        with self.writing(), self.catalog.sessions.begin() as session:
            new_ids = self.items_store.insert(session, items)
            if items:
                self.embeddings.write(session, kind, new_ids, embeddings, encoder, dtype, replace=False)
            self.items_store.record_rejections(session, rejections)
        return new_ids

    def store_embeddings(
        self, kind: str, ids: Sequence[int] | np.ndarray, vectors: np.ndarray,
        dtype: str = "float32",
    ) -> None:
        """Store (or replace) vectors of another kind, e.g. caption embeddings, for items."""
        encoder = self.encoder_name
        if encoder is None:
            raise InputError("the collection has no encoder yet")
        with self.writing(), self.catalog.sessions.begin() as session:
            self.embeddings.write(session, kind, ids, vectors, encoder, dtype)

    def known_uris(self, include_failures: bool = True) -> set[str]:
        """URIs already in the catalog (and, by default, already rejected)."""
        return self.items_store.known_uris(include_failures)

    def find_sha256(self, digests: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Existing items by content hash: sha256 -> (item id, uri)."""
        return self.items_store.find_sha256(digests)

    def item_ids(self, where: dict[str, str] | None = None, *, captioned: bool = False) -> np.ndarray:
        """Sorted item ids; only those whose metadata match ``where`` (``{key: value}``,
        filtered in SQL; see :func:`indexing.items.parse_where`) and, with ``captioned``,
        that have a caption."""
        return self.items_store.ids(where, captioned=captioned)

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        """Item snapshots by id (absent ids are left out)."""
        return self.items_store.records(ids)

    def failures(self, reason: str | None = None, limit: int | None = None) -> list[FailureRecord]:
        return self.items_store.failures(reason, limit)

    def delete(
        self, ids: Sequence[int] = (), uris: Sequence[str] = ()
    ) -> DeleteResult:
        """Delete items by id and/or URI from the catalog, the store and every index version.

        The catalog commits first: a kill before the index files are rewritten leaves them
        with extra ids, which :meth:`sync_index` removes.
        """
        with self.writing():
            with self.catalog.sessions.begin() as session:
                result = self.items_store.delete(session, ids, uris)
            if result.deleted:
                doomed = np.asarray(result.deleted, dtype=np.int64)
                for kind, factory in self.builder.remove_from_versions(doomed):
                    self.sync_index(kind, factory)
        logger.info("deleted %d items", len(result.deleted))
        return result

    # -- index versions ---------------------------------------------------------------------
    def versions(
        self, kind: str | None = None, include_retired: bool = False
    ) -> list[IndexVersionInfo]:
        return self.index_versions.list(kind, include_retired)

    def version(self, name: str) -> IndexVersionInfo:
        return self.index_versions.get(name)

    def current_version(
        self, kind: str = EmbeddingKind.IMAGE, correction: str | None = None
    ) -> IndexVersionInfo | None:
        """The newest ready version for (kind, correction), or None."""
        return self.index_versions.current(kind, correction)

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
        info = self.index_versions.resolve(version, kind, correction)
        if encoder is not None and encoder != info.encoder:
            raise EncoderMismatchError(
                f"index version {info.name!r} was built with encoder {info.encoder!r} "
                f"(dim {info.dim}); it cannot be searched with encoder {encoder!r}"
            )
        return info, self.builder.load(info)

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
        one; added vectors are staged (a flat version's in-memory index), and every
        ``checkpoint_every`` vectors those added since the last checkpoint are saved beside
        the index file (hidden ``.npy`` segments and a ``.progress`` record). On success the
        index file is written by ``faiss.write_index`` (a flat version: the staged index;
        others: filled from the staged vectors) and saved atomically, the version becomes
        ``ready`` and the previous ready version of the same (kind, correction) is
        ``retired`` in one transaction, and the staging files are removed; a version holding
        NaN or infinite values is an :class:`InputError` instead. On an exception it is
        checkpointed and ``failed``. With ``resume`` an unfinished version of the same kind,
        correction, factory, encoder and dimension is continued from its last checkpoint
        (``writer.done_ids``); staged ids that lost their stored embedding since are
        dropped. ``expected_count``: how many vectors will be added (room is made for them
        at once). ``factory`` None is ``auto`` (:mod:`indexing.index_factory`; Flat below 100k
        vectors); an IVF version's lists go on disk, its nprobe tuned (:mod:`indexing.ondisk_ivf`).
        """
        encoder = self.encoder_name
        dim = dim if dim is not None else self.dim
        if encoder is None or dim is None:
            raise InputError("the collection has no encoder yet; build it first")
        VectorIndex.create(int(dim), factory)  # a bad factory string fails before a version is recorded
        with self.writing():
            with self.builder.build(
                kind=kind, correction=correction, factory=factory, encoder=encoder,
                dim=int(dim), parameters=parameters or {}, resume=resume,
                checkpoint_every=checkpoint_every, expected_count=expected_count,
            ) as writer:
                yield writer
            # published: apply the retention rule (collect_garbage), so retired files do not pile up
            self.index_versions.collect_garbage()

    @contextlib.contextmanager
    def edit_index_version(self, name: str, index: VectorIndex | None = None) -> Iterator[VectorIndex]:
        """Change an existing version in place (add or remove vectors); saved atomically on exit.

        ``index``: the version's file already loaded (as it is on disk), so it is not read again.
        """
        with self.writing(), self.builder.edit(name, index) as edited:
            yield edited

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
        encoder, dim = self.encoder_name, self.dim
        if encoder is None or dim is None:
            raise InputError("the collection has no encoder yet; build it first")
        with self.writing():
            current = self.builder.sync(
                kind, factory, encoder=encoder, dim=dim, train_size=train_size, chunk_size=chunk_size
            )
            self.index_versions.collect_garbage()  # the retention rule, when it built a version
            return current

    def collect_garbage(self, keep: int | None = None, *, dry_run: bool = False) -> GarbageReport:
        """Remove the files of retired versions beyond the newest ``keep`` (default
        :data:`~indexing.index_versions.DEFAULT_KEEP_RETIRED`) of each (kind, correction);
        see :meth:`IndexVersions.collect_garbage`."""
        with self.writing():
            return self.index_versions.collect_garbage(keep, dry_run=dry_run)

    def remove_retired_files(self) -> int:
        """Delete the files of every retired version (after readers have moved on)."""
        return len(self.collect_garbage(keep=0).removed)

    # -- overview ---------------------------------------------------------------------------
    def info(self) -> CollectionInfo:
        return CollectionInfo(
            root=self.root,
            catalog_url=self.catalog.url,
            encoder=self.encoder_name,
            dim=self.dim,
            items=self.items_store.count(),
            embeddings=self.embeddings.counts(),
            failures=self.items_store.failure_counts(),
            versions=self.versions(include_retired=True),
            encoder_weights=self.encoder_weights,
        )


def _make_folder(root: Path) -> Path | None:
    """Create ``root`` and its missing parents; return the topmost folder this call made."""
    top: Path | None = None
    for folder in [*reversed(root.parents), root]:
        if folder.is_dir():
            continue
        try:
            folder.mkdir()
        except FileExistsError:  # made by another process just now: not ours to remove
            continue
        top = top or folder
    return top


def _create_or_open_catalog(root: Path, target: str | Path) -> tuple[Catalog, Path | None]:
    """Open the catalog at ``target``, creating it (and ``root``) if missing.

    Returns it and the topmost folder this call created (None when ``root`` existed), which is
    removed again when creating the catalog fails. Processes creating the same collection take
    turns on a lock file in ``root``, so only one of them creates the schema; the others then
    open what it created.

    The lock is filelock's ``FileLock`` (flock on Unix): the kernel releases it when its holder
    is killed, whereas a ``SoftFileLock`` left by a kill would make every later creator wait
    :data:`CREATE_WAIT_SECONDS` and fail. It lives in ``root``, the one place this call must be
    able to write anyway (the parent may be read-only or shared). flock leaves the file on
    release, so its holder unlinks it before releasing it: a waiter that then locks the unlinked
    file is one filelock detects (it re-checks ``st_nlink`` after locking and retries on a new
    file), and even one that slipped through would be safe: creating a catalog with
    :func:`~indexing.catalog.open_catalog` is idempotent across processes (a test checks both).
    """
    created = _make_folder(root)
    lock_path = root / CREATE_LOCK_FILENAME
    try:
        with FileLock(lock_path, timeout=CREATE_WAIT_SECONDS):
            try:
                return open_catalog(target, create=True), created
            except BaseException:
                if created is not None:  # nothing in it is anyone else's yet
                    shutil.rmtree(created, ignore_errors=True)
                raise
            finally:
                lock_path.unlink(missing_ok=True)  # while held: see above
    except Timeout as error:
        raise CollectionBusyError(
            f"another process has been creating collection {root} for over "
            f"{CREATE_WAIT_SECONDS:.0f} s; try again when it is done"
        ) from error
