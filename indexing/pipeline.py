"""The indexing pipeline: reader -> decode/preprocess (threads) -> encoder batches -> writer.

Each stage is a plain function over records or batches, so another runner (Ray Data,
Spark) can run the same stages on many machines; :func:`run_build` is the local runner.

Faults in files never stop a build: every file that cannot become an item (missing, empty,
truncated, not an image, a decompression bomb, a duplicate of an indexed file, a subfolder
that cannot be read, ...) is recorded in the catalog's ``failures`` table with its reason.
A listing that cannot be read (not UTF-8, a malformed row) or lists nothing is refused
before anything is written. Work is committed in shards,
so a build that is killed and run again skips what is already in the catalog and re-encodes
nothing; the index is then synced from the stored embeddings.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
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
class PreparedImage:
    """A decoded, preprocessed image and what the catalog needs to know about it."""

    record: SourceRecord
    sha256: str
    width: int
    height: int
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


# -- stage 3: dedup and encode --------------------------------------------------------------
def drop_duplicates(
    prepared: list[PreparedImage],
    indexed: Callable[[list[str]], dict[str, tuple[int, str]]],
    seen_in_run: dict[str, str],
) -> tuple[list[PreparedImage], list[Rejection]]:
    """Split a batch into new images and duplicates (of indexed items or of this run's)."""
    existing = indexed([image.sha256 for image in prepared])
    kept: list[PreparedImage] = []
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
    prepared: list[PreparedImage],
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
    report = BuildReport(source=str(source) if isinstance(source, (str, Path)) else "<records>")
    with collection.writing():
        # Checks that need no encoding come first: a bad source, encoder or factory string
        # should fail before hours of work, and before the collection is bound to an encoder.
        # The whole listing is read first, so a malformed or empty one changes nothing.
        records = read_source(source, image_root) if isinstance(source, (str, Path)) else source
        pending = select_pending(
            records, collection.known_uris(include_failures=not retry_failed), report
        )
        if not report.listed:
            raise InputError(f"{report.source}: nothing listed")
        encoder = resolve_encoder(encoder, collection)
        collection.check_encoder(encoder.name, encoder.dim)
        if factory is not None:
            VectorIndex.create(encoder.dim, factory)
        collection.bind_encoder(encoder.name, encoder.dim)
        collection.embeddings.remove_unreferenced_files()
        logger.info(
            "%s: %d listed, %d already in the catalog, %d to index",
            report.source, report.listed, report.already_known, len(pending),
        )
        prepare = functools.partial(prepare_image, preprocess=encoder.preprocess, max_pixels=max_pixels)
        seen_in_run: dict[str, str] = {}
        shard_items: list[PreparedImage] = []
        shard_vectors: list[np.ndarray] = []
        shard_rejections: list[Rejection] = []

        def flush() -> None:
            if shard_items or shard_rejections:
                write_shard(collection, shard_items, shard_vectors, shard_rejections, embedding_dtype)
                report.added += len(shard_items)
                for rejection in shard_rejections:
                    report.rejected[str(rejection.reason)] += 1
                shard_items.clear()
                shard_vectors.clear()
                shard_rejections.clear()

        bar = tqdm(total=len(pending), unit="img", desc="indexing", disable=not progress)
        # PIL only warns between its own limit and twice that; make the warning an error so
        # the worker rejects the file instead of decoding it.
        with bar, warnings.catch_warnings():
            from PIL import Image

            warnings.simplefilter("error", Image.DecompressionBombWarning)
            prepared_stream = map_in_threads(prepare, pending, workers, prefetch=2 * batch_size)
            for batch in batched(prepared_stream, batch_size):
                images = [entry for entry in batch if isinstance(entry, PreparedImage)]
                shard_rejections.extend(entry for entry in batch if isinstance(entry, Rejection))
                images, duplicates = drop_duplicates(images, collection.find_sha256, seen_in_run)
                shard_rejections.extend(duplicates)
                if images:
                    shard_vectors.append(encode_batch(encoder, images))
                    shard_items.extend(images)
                bar.update(len(batch))
                if len(shard_items) >= shard_size or len(shard_rejections) >= shard_size:
                    flush()
            flush()
        for reason, count in sorted(report.rejected.items()):
            logger.warning("%s: %d files rejected as %s", report.source, count, reason)
        report.index_version = collection.sync_index(EmbeddingKind.IMAGE, factory)
        if captions:
            from indexing.captions import embed_captions

            report.caption_index_version = embed_captions(collection, encoder, progress=progress)
    report.seconds = time.perf_counter() - started
    return report


def build_collection(
    source: str | Path | Iterable[SourceRecord],
    collection_dir: str | Path | None = None,
    *,
    db: str | None = None,
    encoder: str | Encoder = "default",
    index_dir: str | Path | None = None,
    **options: Any,
) -> BuildReport:
    """Create (or resume) the collection at ``collection_dir`` and index ``source`` into it.

    ``options`` are those of :func:`run_build` (factory, image_root, batch_size, workers,
    shard_size, max_pixels, retry_failed, embedding_dtype, progress).
    """
    # A refused build of a new collection leaves nothing behind: the encoder spec and the
    # factory string are checked before anything is created (loading an encoder loads no
    # weights), and a build that fails before storing anything removes the folder it created.
    encoder = resolve_encoder(encoder)
    if options.get("factory") is not None:
        VectorIndex.create(encoder.dim, options["factory"])
    collection = Collection.open(collection_dir, db, create=True, index_dir=index_dir)
    try:
        report = run_build(collection, source, encoder, **options)
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
    **options: Any,
) -> BuildReport:
    """Add the new files of ``source`` to an existing collection (dedup by sha256)."""
    with Collection.open(collection_dir, db) as collection:
        return run_build(collection, source, encoder, **options)
