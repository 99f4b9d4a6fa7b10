"""``engine="ray"``: the indexing pipeline's stages (:mod:`indexing.pipeline`) on Ray Data.

- read: the driver reads the listing and selects what is new (:func:`~indexing.pipeline.begin_build`,
  the same readers as the local engine); the pending records become a dataset
  (``ray.data.from_items``: URI, path, listing error; captions and metadata stay on the driver).
- encode: ``map_batches`` with a callable class (:class:`EncodeImages`, :class:`EncodeTexts`) in a
  fixed-size actor pool, so each actor loads the encoder once; it decodes and preprocesses with
  the local engine's :func:`~indexing.pipeline.prepare_image` and encodes with
  :func:`~indexing.pipeline.encode_batch`.
- write: the driver consumes the output batches in listing order (``preserve_order``) and
  writes them through the same :class:`~indexing.pipeline.ShardWriter` and
  :func:`~indexing.pipeline.finish_build`, so the catalog, the embedding shards and the index
  are written exactly as the local engine writes them, with its checkpoints: a killed driver
  is resumed by running the command again (stored items are skipped).

Without ``address`` a local Ray cluster is started for the job (and shut down after it); with
one, the job joins that cluster. A process already connected to Ray (``ray.init`` called by the
caller) uses its connection. The image paths must be readable by every node (a shared file
system) when the cluster has several machines. Ray is imported only here, when a job runs.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from indexing.catalog import EmbeddingKind, RejectReason
from indexing.collection import Collection, Rejection
from indexing.images import DEFAULT_MAX_PIXELS
from indexing.pipeline import (
    BuildReport,
    LoadedImage,
    PreparedImage,
    ShardWriter,
    begin_build,
    bombs_rejected,
    encode_batch,
    finish_build,
    map_in_threads,
    new_report,
    prepare_image,
)
from indexing.readers import SourceRecord
from sce_correct.errors import InputError, MissingDependencyError, SceError

if TYPE_CHECKING:  # pragma: no cover
    from indexing.encoders import Encoder

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sce-retrieval[ray]'"


# -- the cluster ---------------------------------------------------------------------------------
def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line MissingDependencyError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


ADDRESS_TIMEOUT_S = 5.0


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse a cluster address where nothing answers, in ``timeout`` seconds, before
    ``ray.init``: there, Ray itself retries for minutes. ``host:port`` (a GCS address) and
    ``ray://host:port`` (Ray Client) are checked with a TCP connect; ``auto``, ``local`` and
    an address without a port are left to Ray."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = "no answer in %g s" % timeout if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise InputError(f"--address {address}: no Ray cluster answers at {host}:{port} ({reason}); "
                         "start one with `ray start --head` or give the address it prints") from None


@contextlib.contextmanager
def ray_cluster(address: str | None = None, *, num_cpus: int | None = None,
                object_store_memory: int | None = None) -> Iterator[Any]:
    """Connected to Ray while open: the cluster at ``address``, or a local one started here.

    A process that is connected already keeps its connection (and it is not shut down here).
    """
    ray = import_ray()
    if ray.is_initialized():
        if address:
            logger.info("already connected to Ray (%s); --address %s not used",
                        ray.get_runtime_context().gcs_address, address)
        yield ray
        return
    if address:
        check_address(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=object_store_memory, logging_level=logging.WARNING)
    except ConnectionError as error:
        raise InputError(f"--address {address}: cannot join a Ray cluster there ({error})") from None
    logger.info("Ray cluster %s: %s CPUs", ray.get_runtime_context().gcs_address,
                int(ray.cluster_resources().get("CPU", 0)))
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def quiet_ordered_execution(ray: Any) -> Iterator[Any]:
    """Ray Data's context for our jobs: outputs in input order (so items get the local engine's
    ids), and our own progress bar instead of Ray's."""
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    # Ray Data logs each execution at INFO, and warns that its bars are off: ours are on
    loggers = {logging.getLogger("ray.data"): logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING,
               logging.getLogger("ray.data._internal.progress"): logging.ERROR}
    levels = {each: each.level for each in loggers}
    for each, level in loggers.items():
        each.setLevel(level)
    try:
        yield context
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        for each, level in levels.items():
            each.setLevel(level)


def actor_pool(ray: Any, actors: int | None, batches: int) -> Any:
    """A fixed-size actor pool: ``actors``, or one per CPU of the cluster; never more than
    there are ``batches`` to give them."""
    size = actors if actors is not None else max(1, int(ray.cluster_resources().get("CPU", 1)))
    if size < 1:
        raise InputError(f"--actors must be at least 1; got {size}")
    return ray.data.ActorPoolStrategy(size=max(1, min(size, batches)))


def blocks_for(rows: int, batch_size: int) -> int:
    """Input blocks of a dataset of ``rows``: one per batch (so every actor gets work), at most 1024."""
    return max(1, min(-(-rows // batch_size), 1024))


# -- a user's mistake met in an actor ----------------------------------------------------------------
ERROR_COLUMN = "sce_error"


def returning_sce_errors(call: Callable[..., dict[str, np.ndarray]]) -> Callable[..., dict[str, np.ndarray]]:
    """Wrap a ``map_batches`` ``__call__``: an SceError it raises (a missing checkpoint, a
    damaged embedding file) comes back as a one-row batch naming it, which
    :func:`raise_sce_error` raises again in the driver as the same error class with the same
    message; Ray would deliver it wrapped in its own exception, with the worker's traceback."""

    @functools.wraps(call)
    def wrapper(self: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return call(self, batch)
        except SceError as error:
            base = next(kind for kind in type(error).__mro__ if kind.__module__ == SceError.__module__)
            return {ERROR_COLUMN: np.array([f"{base.__name__}:{error}"], dtype=object)}

    return wrapper


def raise_sce_error(batch: dict[str, np.ndarray]) -> None:
    """Raise the SceError an actor returned in ``batch`` (see :func:`returning_sce_errors`), if any."""
    if ERROR_COLUMN in batch:
        from sce_correct import errors

        name, _, message = str(batch[ERROR_COLUMN][0]).partition(":")
        raise getattr(errors, name, SceError)(message)


# -- the encoder in the actors -------------------------------------------------------------------
def encoder_recipe(encoder: Encoder) -> tuple[Any, Any]:
    """What an actor needs to make the encoder: (``indexing.load_encoder``, its spec) when its
    name loads it with the same weights (every product encoder as installed: no weights are sent,
    each actor loads them once), else (None, the encoder object itself, which must pickle; e.g.
    an ``EmojiVitEncoder`` given another weights file)."""
    import indexing

    loader = indexing.load_encoder  # the driver's (a patched loader, e.g. the tests' toy encoder, goes too)
    try:
        loaded = loader(encoder.name)
        if loaded.name == encoder.name and getattr(loaded, "weights_id", None) == getattr(encoder, "weights_id", None):
            return loader, encoder.name
    except (InputError, ValueError):
        pass
    return None, encoder


def _make_encoder(recipe: tuple[Any, Any]) -> Encoder:
    loader, what = recipe
    return loader(what) if loader is not None else what


class EncodeImages:
    """``map_batches`` callable: decode, preprocess and encode a batch of listed files.

    Each actor makes the encoder once. Output rows, one per input row and in its order: uri,
    sha256, width, height and the embedding of an image, or the reason and detail of a file
    that failed (sha256 empty when unknown, embedding zeros).
    """

    def __init__(self, recipe: tuple[Any, Any], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 0) -> None:
        self.encoder = _make_encoder(recipe)
        self.prepare = functools.partial(prepare_image, preprocess=self.encoder.preprocess, max_pixels=max_pixels)
        self.workers = workers

    @returning_sce_errors
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [SourceRecord(str(uri), Path(str(path)) if path else None, error=str(error) or None)
                   for uri, path, error in zip(batch["uri"], batch["path"], batch["error"])]
        with bombs_rejected():
            prepared = list(map_in_threads(self.prepare, records, self.workers, prefetch=len(records)))
        images = [entry for entry in prepared if isinstance(entry, PreparedImage)]
        embeddings = np.zeros((len(records), self.encoder.dim), dtype=np.float32)
        if images:
            good = np.array([isinstance(entry, PreparedImage) for entry in prepared])
            embeddings[good] = encode_batch(self.encoder, images)
        return {
            "uri": np.array([record.uri for record in records], dtype=object),
            "sha256": np.array([entry.sha256 or "" for entry in prepared], dtype=object),
            "width": np.array([getattr(entry, "width", -1) for entry in prepared], dtype=np.int64),
            "height": np.array([getattr(entry, "height", -1) for entry in prepared], dtype=np.int64),
            "reason": np.array(["" if isinstance(entry, PreparedImage) else str(entry.reason)
                                for entry in prepared], dtype=object),
            "detail": np.array([getattr(entry, "detail", "") for entry in prepared], dtype=object),
            "embedding": embeddings,
        }


class EncodeTexts:
    """``map_batches`` callable: the text embeddings of a batch of (id, caption) rows."""

    def __init__(self, recipe: tuple[Any, Any]) -> None:
        self.encoder = _make_encoder(recipe)

    @returning_sce_errors
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = np.asarray(self.encoder.encode_texts([str(text) for text in batch["caption"]]), dtype=np.float32)
        return {"id": np.asarray(batch["id"], dtype=np.int64), "embedding": vectors.reshape(len(batch["id"]), -1)}


def _encoded_rows(batch: dict[str, np.ndarray], records: dict[str, SourceRecord]
                  ) -> tuple[list[LoadedImage], np.ndarray, list[Rejection]]:
    """An output batch of :class:`EncodeImages` as the writer's images, embeddings and rejections."""
    images: list[LoadedImage] = []
    rows: list[int] = []
    rejections: list[Rejection] = []
    for position, (uri, sha256, width, height, reason, detail) in enumerate(zip(
            batch["uri"], batch["sha256"], batch["width"], batch["height"], batch["reason"], batch["detail"])):
        uri = str(uri)
        if reason:
            rejections.append(Rejection(uri, RejectReason(str(reason)), str(detail), str(sha256) or None))
        else:
            images.append(LoadedImage(records[uri], str(sha256), int(width), int(height)))
            rows.append(position)
    return images, np.asarray(batch["embedding"], dtype=np.float32)[rows], rejections


# -- the runner ----------------------------------------------------------------------------------
def run_build_on_ray(
    collection: Collection,
    source: str | Path | Iterable[SourceRecord],
    encoder: str | Encoder | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    actors: int | None = None,
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
    """:func:`indexing.pipeline.run_build` on Ray Data: the same arguments and result, plus
    ``address`` (a cluster to join; default: start a local one with ``num_cpus``), ``actors``
    (encoder actors; default one per CPU of the cluster) and ``workers`` (decoding threads per
    actor)."""
    import_ray()  # before any work: a missing Ray is one line
    started = time.perf_counter()
    report = new_report(source)
    with collection.writing():
        pending, encoder = begin_build(collection, source, encoder, report, factory=factory,
                                       image_root=image_root, retry_failed=retry_failed)
        recipe = encoder_recipe(encoder)
        writer = ShardWriter(collection, report, shard_size, embedding_dtype)
        with ray_cluster(address, num_cpus=num_cpus) as ray, quiet_ordered_execution(ray):
            if pending:
                records = {record.uri: record for record in pending}
                rows = [{"uri": r.uri, "path": "" if r.path is None else str(r.path), "error": r.error or ""}
                        for r in pending]
                blocks = blocks_for(len(rows), batch_size)
                dataset = ray.data.from_items(rows, override_num_blocks=blocks)
                dataset = dataset.map_batches(
                    EncodeImages, fn_constructor_kwargs={"recipe": recipe, "max_pixels": max_pixels, "workers": workers},
                    batch_size=batch_size, batch_format="numpy", compute=actor_pool(ray, actors, blocks),
                )
                with tqdm(total=len(pending), unit="img", desc="indexing (ray)", disable=not progress) as bar:
                    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                        raise_sce_error(batch)
                        images, vectors, rejections = _encoded_rows(batch, records)
                        keep = writer.keep_new(images)
                        writer.add([images[i] for i in keep], vectors[keep], rejections)
                        bar.update(len(batch["uri"]))
                writer.flush()
            if captions:
                _embed_captions_on_ray(ray, collection, recipe, actors, progress)
        finish_build(collection, encoder, report, factory=factory, captions=captions, progress=progress)
    report.seconds = time.perf_counter() - started
    return report


def _embed_captions_on_ray(ray: Any, collection: Collection, recipe: tuple[Any, Any], actors: int | None,
                           progress: bool, batch_size: int = 1024) -> None:
    """Store the caption embeddings the collection lacks, encoded by actors; the caption index
    is then synced by :func:`finish_build` (whose local pass finds nothing left to encode)."""
    from indexing.captions import pending_captions

    ids, texts = pending_captions(collection)
    if not len(ids):
        return
    blocks = blocks_for(len(ids), batch_size)
    dataset = ray.data.from_items([{"id": int(i), "caption": t} for i, t in zip(ids.tolist(), texts)],
                                  override_num_blocks=blocks)
    dataset = dataset.map_batches(EncodeTexts, fn_constructor_kwargs={"recipe": recipe}, batch_size=batch_size,
                                  batch_format="numpy", compute=actor_pool(ray, actors, blocks))
    with tqdm(total=len(ids), desc="captions (ray)", unit="text", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            raise_sce_error(batch)
            collection.store_embeddings(EmbeddingKind.CAPTION, batch["id"], batch["embedding"])
            bar.update(len(batch["id"]))
    logger.info("stored %d caption embeddings", len(ids))
