"""The indexing pipeline: reader -> decode/preprocess (threads) -> encoder batches -> writer.

Each stage is a plain function over records or batches, so another runner can run the same
stages on many machines: :func:`begin_build` (read, check, select what is new),
:func:`prepare_image` / :func:`encode_batch` (decode, preprocess, encode), :class:`ShardWriter`
(drop duplicates, commit shards) and :func:`finish_build` (sync the index, captions).
:func:`run_build` is the local runner; ``indexing.ray_engine`` runs the same stages on Ray
Data (``engine="ray"``).

Faults in files never stop a build: every file that cannot become an item (missing, empty,
truncated, not an image, a decompression bomb, a duplicate of an indexed file, a subfolder
that cannot be read, ...) is recorded in the catalog's ``failures`` table with its reason.
A listing that cannot be read (not UTF-8, a malformed row) or lists nothing is refused
before anything is written. Work is committed in shards,
so a build that is killed and run again skips what is already in the catalog and re-encodes
nothing; the index is then synced from the stored embeddings.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from indexing.catalog import EmbeddingKind, RejectReason
from indexing.collection import (
    Collection,
    IndexVersionInfo,
    NewItem,
    Rejection,
)
from indexing.images import DEFAULT_MAX_PIXELS, ImageCheckError, decode_image, read_image_file
from indexing.readers import SourceRecord, read_source
from indexing.vector_index import VectorIndex
from sce_correct.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from indexing.encoders import Encoder

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class LoadedImage:
    """A decoded image's facts that the catalog records (what a writer needs of it)."""

    record: SourceRecord
    sha256: str
    width: int
    height: int


@dataclass
class PreparedImage(LoadedImage):
    """A decoded, preprocessed image: its facts and the encoder's input."""

    pixels: torch.Tensor


@dataclass
class BuildReport:
    """What a build or add did."""

    source: str
    listed: int = 0
    already_known: int = 0
    repeated_uris: int = 0
    added: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    index_version: IndexVersionInfo | None = None
    caption_index_version: IndexVersionInfo | None = None


# -- stage 1: read ---------------------------------------------------------------------------
def select_pending(
    records: Iterable[SourceRecord], known_uris: set[str], report: BuildReport
) -> list[SourceRecord]:
    """Records not yet in the catalog (nor rejected before), each URI once."""
    pending: list[SourceRecord] = []
    seen: set[str] = set()
    for record in records:
        report.listed += 1
        if record.uri in known_uris:
            report.already_known += 1
        elif record.uri in seen:
            report.repeated_uris += 1
        else:
            seen.add(record.uri)
            pending.append(record)
    return pending


# -- stage 2: decode and preprocess (runs in worker threads) --------------------------------
def load_image(record: SourceRecord, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str] | Rejection:
    """Read, hash and fully decode one file (the one image check, indexing.images); a
    :class:`Rejection` says why it failed."""
    if record.path is None:
        return Rejection(record.uri, RejectReason.MISSING, "the row names no image file")
    if record.error is not None:  # listed by the reader as unreadable (a folder)
        return Rejection(record.uri, RejectReason.UNREADABLE, record.error)
    try:
        data = read_image_file(record.path)
    except ImageCheckError as error:
        return Rejection(record.uri, RejectReason(error.reason), error.detail)
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, record.uri, max_pixels)
    except ImageCheckError as error:
        return Rejection(record.uri, RejectReason(error.reason), error.detail, digest)
    return image, digest


def prepare_image(
    record: SourceRecord,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage | Rejection:
    """Load one file and run the encoder's preprocess on it; never raises."""
    try:
        loaded = load_image(record, max_pixels)
    except Exception as error:  # anything load_image did not foresee
        return Rejection(record.uri, RejectReason.CORRUPT, f"{type(error).__name__}: {error}")
    if isinstance(loaded, Rejection):
        return loaded
    image, digest = loaded
    try:
        pixels = preprocess(image)
    except Exception as error:
        return Rejection(
            record.uri, RejectReason.PREPROCESS_FAILED, f"{type(error).__name__}: {error}", digest
        )
    return PreparedImage(record, digest, image.width, image.height, pixels)


def map_in_threads(
    function: Callable[[T], R], items: Iterable[T], workers: int, prefetch: int
) -> Iterator[R]:
    """``map`` in a thread pool, in input order, with at most ``prefetch`` items in flight."""
    if workers <= 0:
        yield from map(function, items)
        return
    iterator = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sce-decode")
    try:
        in_flight: deque[Future[R]] = deque(
            pool.submit(function, item) for item in itertools.islice(iterator, max(1, prefetch))
        )
        while in_flight:
            result = in_flight.popleft().result()
            for item in itertools.islice(iterator, 1):
                in_flight.append(pool.submit(function, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


@contextlib.contextmanager
def bombs_rejected() -> Iterator[None]:
    """While open, PIL's DecompressionBombWarning is an error, so a worker rejects the file.

    PIL only warns between its own limit and twice that; whichever process decodes (this
    one, or a Ray worker) opens this around its decoding.
    """
    with warnings.catch_warnings():
        from PIL import Image

        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


# -- stage 3: dedup and encode --------------------------------------------------------------
ImageT = TypeVar("ImageT", bound=LoadedImage)


def drop_duplicates(
    prepared: list[ImageT],
    indexed: Callable[[list[str]], dict[str, tuple[int, str]]],
    seen_in_run: dict[str, str],
) -> tuple[list[ImageT], list[Rejection]]:
    """Split a batch into new images and duplicates (of indexed items or of this run's)."""
    existing = indexed([image.sha256 for image in prepared])
    kept: list[ImageT] = []
    duplicates: list[Rejection] = []
    for image in prepared:
        if image.sha256 in existing:
            item_id, uri = existing[image.sha256]
            duplicates.append(Rejection(
                image.record.uri, RejectReason.DUPLICATE,
                f"same content as item {item_id} ({uri})", image.sha256, item_id,
            ))
        elif image.sha256 in seen_in_run:
            duplicates.append(Rejection(
                image.record.uri, RejectReason.DUPLICATE,
                f"same content as {seen_in_run[image.sha256]}", image.sha256,
            ))
        else:
            seen_in_run[image.sha256] = image.record.uri
            kept.append(image)
    return kept, duplicates


def encode_batch(encoder: Encoder, prepared: list[PreparedImage]) -> np.ndarray:
    """Raw float32 embeddings (n, dim) of a batch of preprocessed images."""
    import torch

    with torch.inference_mode():
        embeddings = encoder.encode_image_batch(torch.stack([image.pixels for image in prepared]))
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.shape != (len(prepared), encoder.dim):
        raise ValueError(
            f"encoder {encoder.name!r} returned shape {embeddings.shape}, "
            f"expected ({len(prepared)}, {encoder.dim})"
        )
    return embeddings


# -- stage 4: write -------------------------------------------------------------------------
def write_shard(
    collection: Collection,
    prepared: Sequence[LoadedImage],
    embeddings: list[np.ndarray],
    rejections: list[Rejection],
    dtype: str = "float32",
) -> list[int]:
    """Commit one shard: items, their embeddings and the rejections, in one transaction."""
    items = [
        NewItem(
            uri=image.record.uri,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            caption=image.record.caption,
            metadata=image.record.metadata,
        )
        for image in prepared
    ]
    vectors = np.concatenate(embeddings) if embeddings else None
    return collection.add_items(items, vectors, rejections, kind=EmbeddingKind.IMAGE, dtype=dtype)


class ShardWriter:
    """Stage 4 as one object: drops duplicates, gathers encoded images and rejections, and
    commits them ``shard_size`` at a time (the most a kill can lose), counting in ``report``.

    Every engine writes through it, in listing order, so they store the same items with the
    same ids.
    """

    def __init__(self, collection: Collection, report: BuildReport, shard_size: int,
                 dtype: str = "float32") -> None:
        self.collection = collection
        self.report = report
        self.shard_size = shard_size
        self.dtype = dtype
        self._seen_in_run: dict[str, str] = {}
        self._items: list[LoadedImage] = []
        self._vectors: list[np.ndarray] = []
        self._rejections: list[Rejection] = []

    def keep_new(self, images: Sequence[LoadedImage]) -> list[int]:
        """Positions of the images that are neither indexed nor seen earlier in this run; the
        others are recorded as duplicates."""
        positions = {id(image): position for position, image in enumerate(images)}
        kept, duplicates = drop_duplicates(list(images), self.collection.find_sha256, self._seen_in_run)
        self._rejections.extend(duplicates)
        return [positions[id(image)] for image in kept]

    def add(self, images: Sequence[LoadedImage], vectors: np.ndarray | None,
            rejections: Iterable[Rejection] = ()) -> None:
        """Stage new images (already through :meth:`keep_new`) with their embeddings."""
        self._rejections.extend(rejections)
        if images:
            if vectors is None or len(vectors) != len(images):
                raise ValueError(f"{len(images)} images need {len(images)} embeddings")
            self._items.extend(images)
            self._vectors.append(vectors)
        if len(self._items) >= self.shard_size or len(self._rejections) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self._items or self._rejections:
            write_shard(self.collection, self._items, self._vectors, self._rejections, self.dtype)
            self.report.added += len(self._items)
            for rejection in self._rejections:
                self.report.rejected[str(rejection.reason)] += 1
            self._items.clear()
            self._vectors.clear()
            self._rejections.clear()


# -- the local runner -------------------------------------------------------------------------
def resolve_encoder(encoder: str | Encoder | None, collection: Collection | None = None) -> Encoder:
    """An encoder object from a spec, an object, or (None) the collection's own encoder."""
    if encoder is None:
        if collection is None:
            raise InputError("no encoder given")
        encoder = collection.encoder_name
        if encoder is None:
            raise InputError("the collection has no encoder yet: pass one to build it")
    if isinstance(encoder, str):
        import indexing

        encoder = indexing.load_encoder(encoder)
    return encoder


def begin_build(
    collection: Collection,
    source: str | Path | Iterable[SourceRecord],
    encoder: str | Encoder | None,
    report: BuildReport,
    *,
    factory: str | None = None,
    image_root: str | Path | None = None,
    retry_failed: bool = False,
) -> tuple[list[SourceRecord], Encoder]:
    """Stage 1, with the collection's write lock held: read the listing, check everything that
    needs no encoding, bind the encoder; returns the records still to index and the encoder.

    Checks that need no encoding come first: a bad source, encoder or factory string should
    fail before hours of work, and before the collection is bound to an encoder. The whole
    listing is read first, so a malformed or empty one changes nothing.
    """
    records = read_source(source, image_root) if isinstance(source, (str, Path)) else source
    pending = select_pending(records, collection.known_uris(include_failures=not retry_failed), report)
    if not report.listed:
        raise InputError(f"{report.source}: nothing listed")
    encoder = resolve_encoder(encoder, collection)
    collection.check_writer(encoder)  # name, dim and weights id
    if factory is not None:
        VectorIndex.create(encoder.dim, factory)
    collection.bind_encoder(encoder.name, encoder.dim, getattr(encoder, "weights_id", None))
    collection.embeddings.remove_unreferenced_files()
    logger.info(
        "%s: %d listed, %d already in the catalog, %d to index",
        report.source, report.listed, report.already_known, len(pending),
    )
    return pending, encoder


def finish_build(collection: Collection, encoder: Encoder, report: BuildReport, *,
                 factory: str | None = None, captions: bool = True, progress: bool = True) -> None:
    """The last stage: report the rejections, sync the image index from the stored embeddings,
    and encode the captions into the caption index."""
    for reason, count in sorted(report.rejected.items()):
        logger.warning("%s: %d files rejected as %s", report.source, count, reason)
    report.index_version = collection.sync_index(EmbeddingKind.IMAGE, factory)
    if captions:
        from indexing.captions import embed_captions

        report.caption_index_version = embed_captions(collection, encoder, progress=progress)


def new_report(source: str | Path | Iterable[SourceRecord]) -> BuildReport:
    return BuildReport(source=str(source) if isinstance(source, (str, Path)) else "<records>")


def run_build(
    collection: Collection,
    source: str | Path | Iterable[SourceRecord],
    encoder: str | Encoder | None = None,
    *,
    factory: str | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    shard_size: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retry_failed: bool = False,
    embedding_dtype: str = "float32",
    progress: bool = True,
    captions: bool = True,
) -> BuildReport:
    """Index ``source`` into ``collection`` (new items only) and sync its original index.

    With ``captions`` the items' captions are encoded too, into the caption index.

    ``source`` is a folder, a CSV/JSONL/parquet file, or an iterable of records.
    ``shard_size`` items are committed at a time: the most a kill can lose.
    """
    started = time.perf_counter()
    report = new_report(source)
    with collection.writing():
        pending, encoder = begin_build(collection, source, encoder, report, factory=factory,
                                       image_root=image_root, retry_failed=retry_failed)
        prepare = functools.partial(prepare_image, preprocess=encoder.preprocess, max_pixels=max_pixels)
        writer = ShardWriter(collection, report, shard_size, embedding_dtype)
        bar = tqdm(total=len(pending), unit="img", desc="indexing", disable=not progress)
        with bar, bombs_rejected():
            prepared_stream = map_in_threads(prepare, pending, workers, prefetch=2 * batch_size)
            for batch in batched(prepared_stream, batch_size):
                images = [entry for entry in batch if isinstance(entry, PreparedImage)]
                rejections = [entry for entry in batch if isinstance(entry, Rejection)]
                images = [images[position] for position in writer.keep_new(images)]  # before encoding them
                writer.add(images, encode_batch(encoder, images) if images else None, rejections)
                bar.update(len(batch))
            writer.flush()
        finish_build(collection, encoder, report, factory=factory, captions=captions, progress=progress)
    report.seconds = time.perf_counter() - started
    return report


def build_collection(
    source: str | Path | Iterable[SourceRecord],
    collection_dir: str | Path | None = None,
    *,
    db: str | None = None,
    encoder: str | Encoder = "default",
    index_dir: str | Path | None = None,
    engine: str = "local",
    **options: Any,
) -> BuildReport:
    """Create (or resume) the collection at ``collection_dir`` and index ``source`` into it.

    ``options`` are those of :func:`run_build` (factory, image_root, batch_size, workers,
    shard_size, max_pixels, retry_failed, embedding_dtype, progress); ``engine="ray"`` runs
    it on Ray Data (:func:`indexing.ray_engine.run_build_on_ray`, which also takes
    ``address``, ``num_cpus`` and ``actors``).
    """
    runner = build_runner(engine)
    # A refused build of a new collection leaves nothing behind: the encoder spec and the
    # factory string are checked before anything is created (loading an encoder loads no
    # weights), and a build that fails before storing anything removes the folder it created.
    encoder = resolve_encoder(encoder)
    if options.get("factory") is not None:
        VectorIndex.create(encoder.dim, options["factory"])
    collection = Collection.open(collection_dir, db, create=True, index_dir=index_dir)
    try:
        report = runner(collection, source, encoder, **options)
    except BaseException:
        collection.discard_if_unused()
        raise
    collection.close()
    return report


def add_to_collection(
    source: str | Path | Iterable[SourceRecord],
    collection_dir: str | Path | None = None,
    *,
    db: str | None = None,
    encoder: str | Encoder | None = None,
    engine: str = "local",
    **options: Any,
) -> BuildReport:
    """Add the new files of ``source`` to an existing collection (dedup by sha256)."""
    runner = build_runner(engine)
    with Collection.open(collection_dir, db) as collection:
        return runner(collection, source, encoder, **options)


ENGINES = ("local", "ray")


def build_runner(engine: str) -> Callable[..., BuildReport]:
    """:func:`run_build`, or the same stages on Ray Data (imported only when asked for)."""
    if engine == "local":
        return run_build
    if engine == "ray":
        from indexing.ray_engine import import_ray, run_build_on_ray

        import_ray()  # a missing Ray is one line, before anything is created
        return run_build_on_ray
    raise InputError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
