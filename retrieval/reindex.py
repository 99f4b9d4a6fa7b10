"""Batch re-index: a new index version of a collection with a correction applied.

Reads the stored original embeddings in chunks (never the images), applies the correction
and writes a new index version that is published atomically when complete; searches keep
using the previous version meanwhile. A killed job resumes where its last checkpoint left off.

Variants:
- "projection" (cosine corrections): x -> P x for unit-norm x, stored without renormalising,
  so inner-product scores equal those of the query-side correction (P q) . x.
- "paired": x -> phi(x) - s * Gamma' phi(source), with each item's own caption as the source
  (t2i; images for i2t/t2t on captions), x and the source unit-norm (the space the correction
  was fitted in, :func:`retrieval.corrections.fit_concept_correction`), then renormalised.
  Items without a paired source are stored uncorrected.
- "heads" (head corrections, :mod:`retrieval.head_correction`): each item's image file is
  re-encoded with the correction's heads mean-ablated, then renormalised; items whose file
  cannot be read keep their stored embedding. The only variant that reads images.

The job is a three-stage pipeline, so that disk and compute overlap (numpy, BLAS and file
I/O release the GIL): a reader thread copies stored vectors into reused buffers,
normalising them on the way, this thread applies the correction (one matmul per chunk for a
projection, into a reused output buffer), and a writer thread adds the result to the
version's staged vectors: a flat version's in-memory index, into which every corrected
vector is copied once. Every ``checkpoint_every`` vectors the vectors added since the last
checkpoint are saved as a segment (numpy files, fsync'ed, by a background thread while the
writer goes on) and recorded; a killed job resumes from its segments. Publishing is one ``faiss.write_index`` of the whole index.

:func:`plan_reindex` (what to compute), :func:`corrected_vectors` (the correction of one chunk)
and the version writer are shared by every engine; ``reindex(runner=...)`` swaps only the
middle, e.g. :mod:`retrieval.ray_reindex` computes the vectors on Ray Data actors.

Environment (for tests and tuning; the Python arguments take precedence):
- ``SCE_REINDEX_CHECKPOINT_EVERY``: the checkpoint interval in vectors (default 200,000);
- ``SCE_REINDEX_PAUSE_AFTER_CHECKPOINT``: seconds to stop after each durable checkpoint.
  A test hook: it makes "kill the job after its first checkpoint" deterministic.
"""
from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import indexing
from indexing.collection import Collection, IndexVersionInfo, IndexVersionWriter
from indexing.correction_store import load_correction
from indexing.vector_index import unit_rows, unit_rows_into
from retrieval.head_correction import HeadReencoder
from sce_correct import HeadAblation
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

VARIANTS = ("auto", "projection", "paired", "heads")
HEADS_CHUNK = 1024  # images decoded per chunk by the heads variant (a chunk is also the progress step)
SOURCE_KIND = {"t2i": "caption", "i2t": "image", "t2t": "caption"}
DEFAULT_CHECKPOINT_EVERY = 200_000
CHECKPOINT_ENV = "SCE_REINDEX_CHECKPOINT_EVERY"
PAUSE_ENV = "SCE_REINDEX_PAUSE_AFTER_CHECKPOINT"
_QUEUE_DEPTH = 1  # chunks waiting between two stages (each stage also holds one)


def _paired_source_kind(direction: str) -> str:
    if direction == "t2t":
        raise InputError("a t2t correction has no per-item paired source: re-index it with the projection variant")
    return SOURCE_KIND[direction]


@dataclass
class ReindexPlan:
    """What a re-index job computes, worked out before any vector is read: the correction's
    variant and the inputs of :func:`corrected_vectors` (every engine applies the same)."""

    correction: str
    kind: str
    variant: str
    total: int  # stored vectors of `kind`
    dim: int  # of the corrected vectors
    corrector: Any
    projection: np.ndarray | None  # P (projection variant)
    source_kind: str | None  # the paired variant's source vectors, and the ids that have one
    source_ids: np.ndarray | None
    parameters: dict[str, Any]  # recorded on the index version

    @property
    def normalize_output(self) -> bool:
        """A projection's P x is stored as it is (scores equal the query-side correction's)."""
        return self.variant != "projection"

    def apply_args(self, collection: Collection) -> tuple:
        return (collection, self.corrector, self.projection, self.source_kind, self.source_ids)


def plan_reindex(collection: Collection, correction: str, variant: str = "auto", encoder=None) -> ReindexPlan:
    """Check the request and work out the job (an InputError names what is wrong). ``encoder``:
    the collection's encoder if already loaded (a head correction re-encodes with it; else it is
    loaded on the first chunk)."""
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    stored = load_correction(collection, correction)
    corrector, info = stored.corrector, stored.info
    kind = info.target_kind
    heads = isinstance(corrector, HeadAblation)
    if variant == "auto":
        variant = "heads" if heads else "projection" if corrector.kernel == "cosine" else "paired"
    if heads != (variant == "heads"):
        raise InputError(f"correction {correction!r} is a head correction: only the heads variant applies" if heads
                         else f"the heads variant applies to head corrections; {correction!r} is a Schur correction")
    if variant == "paired" and info.parameters.get("from_metadata"):
        raise InputError(f"correction {correction!r} was fitted within groups (--from-metadata): its paired form would "
                         "also remove what differs between groups; re-index it with the projection variant")
    if variant == "projection" and corrector.kernel != "cosine":
        raise InputError(f"correction {correction!r} uses the {corrector.kernel} kernel: only the paired variant applies")
    total = collection.embeddings.count(kind)
    if total == 0:
        raise InputError(f"the collection has no stored {kind} embeddings to re-index")
    if heads:
        P, source_kind, source_ids, dim = None, None, None, corrector.n_features_in_
        # it re-encodes the items' images: refused before a version is recorded when the installed
        # weights are not the collection's (constructing the encoder loads none)
        collection.check_writer(encoder if encoder is not None else indexing.load_encoder(collection.encoder_name))
        corrector = HeadReencoder(corrector, encoder)
    elif variant == "projection":
        P = corrector.projection(n_components=info.parameters.get("n_components"),
                                 mode=info.parameters.get("mode", "nullify")).astype(np.float32)
        dim = P.shape[0]
        source_kind, source_ids = None, None
    else:
        P = None
        source_kind = _paired_source_kind(info.direction)
        source_ids = collection.embeddings.ids(source_kind)  # once per job, not per chunk
        if not len(source_ids):
            raise InputError(f"the paired variant needs stored {source_kind} embeddings; this collection has none")
        dim = corrector.feature_map_.n_output_features_
    # The fit's time stamp: a job killed before the correction was fitted again (same name,
    # --replace) must not be resumed with the new one, which would mix two corrections.
    parameters = {"variant": variant, "correction_fitted_at": info.created_at.isoformat(),
                  "correction_parameters": {k: v for k, v in info.parameters.items() if k != "concept_vector"}}
    return ReindexPlan(correction, kind, variant, total, dim, corrector, P, source_kind, source_ids, parameters)


#: ``runner(collection, plan, chunk_size, writer, bar) -> vectors computed``: corrects and stages
#: every stored vector of ``plan.kind`` not in ``writer.done_ids`` (the local one: :func:`_run_local`).
Runner = Callable[[Collection, ReindexPlan, int, IndexVersionWriter, Any], int]


def reindex(collection: Collection, correction: str, *, variant: str = "auto", chunk_size: int = 65536,
            factory: str | None = None, progress: bool = True,
            checkpoint_every: int | None = None, runner: Runner | None = None, encoder=None) -> IndexVersionInfo:
    """Build (or resume) the corrected index version for `correction`; returns it once published.

    ``encoder``: the collection's encoder, when the caller has it loaded (the web UI), so that a
    head correction does not load a second copy.

    ``runner``: what computes the vectors (default this process's pipeline; the Ray engine,
    :mod:`retrieval.ray_reindex`, passes its own); the version is written here either way.
    """
    if checkpoint_every is None:
        checkpoint_every = int(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT_EVERY)
    if checkpoint_every < 1 or chunk_size < 1:
        raise InputError("chunk_size and checkpoint_every must be positive")
    plan = plan_reindex(collection, correction, variant, encoder=encoder)
    if plan.variant == "heads":
        chunk_size = min(chunk_size, HEADS_CHUNK)
    started = time.perf_counter()
    with collection.new_index_version(kind=plan.kind, correction=correction, factory=factory, dim=plan.dim,
                                      parameters=plan.parameters, checkpoint_every=checkpoint_every,
                                      expected_count=plan.total) as writer:
        resumed = writer.resumed
        if writer.needs_training:  # before the loop: a resumed job may have nothing left to add
            sample_ids, sample_raw = collection.embeddings.sample(plan.kind, 50_000)
            writer.train(corrected_vectors(collection, plan, sample_ids, sample_raw))
        bar = tqdm(total=plan.total, desc=f"re-index {correction}", unit="vec", disable=not progress,
                   initial=resumed)
        try:
            computed = (runner or _run_local)(collection, plan, chunk_size, writer, bar)
        finally:
            bar.close()
        version = writer.version
    logger.info("re-index %s: computed %d vectors, reused %d from checkpoints, %.1f s",
                correction, computed, resumed, time.perf_counter() - started)
    if isinstance(plan.corrector, HeadReencoder) and plan.corrector.uncorrected:
        logger.warning("re-index %s: %d item(s) kept their original embedding (no readable image file)",
                       correction, plan.corrector.uncorrected)
    logger.info("published index version %s for correction %s", version.name, correction)
    return collection.version(version.name)


def corrected_vectors(collection: Collection, plan: ReindexPlan, ids: np.ndarray, raw: np.ndarray,
                      out: np.ndarray | None = None, is_unit: bool = False) -> np.ndarray:
    """The corrected vectors of one chunk of stored vectors (``raw``, of items ``ids``); see :func:`_apply`."""
    return _apply(*plan.apply_args(collection), ids, raw, out, is_unit)


def _run_local(collection: Collection, plan: ReindexPlan, chunk_size: int, writer: IndexVersionWriter,
               bar: Any) -> int:
    return _run(collection, plan.kind, chunk_size, writer, plan.apply_args(collection),
                normalize_output=plan.normalize_output, bar=bar)


def _apply(collection, corrector, P, source_kind, source_ids, ids, raw, out=None, is_unit=False) -> np.ndarray:
    """Corrected vectors for one chunk: P x (projection, P given) or the paired correction.

    ``is_unit``: the rows of ``raw`` are unit-norm already (the pipeline normalises them
    while copying them); ``out``: where to write P x (a reused buffer).
    """
    if isinstance(corrector, HeadReencoder):
        return corrector.vectors(collection, ids, raw)
    x = raw if is_unit else unit_rows(raw)  # float32 throughout: this is the hot loop
    if P is not None:
        return np.matmul(x, P.T, out=out)
    has_source = np.isin(ids, source_ids)
    out = corrector.feature_map_.transform(x)  # phi(x), corrected below where a source exists
    if has_source.any():
        source = unit_rows(collection.embeddings.get(source_kind, ids[has_source]))  # stored raw, unit like x
        out[has_source] -= corrector.explained(source)
    return out.astype(np.float32, copy=False)  # renormalised by the writer (normalize=True)


# -- the pipeline ----------------------------------------------------------------------------
_DONE = object()


class _Stop(Exception):
    """Another stage failed: this one stops."""


class _Pool:
    """At most `size` reused float32 (rows, dim) buffers; `take` blocks until one is free."""

    def __init__(self, size: int, stop: threading.Event) -> None:
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._left = size
        self._stop = stop

    def take(self, rows: int, dim: int) -> np.ndarray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._left > 0:
            self._left -= 1
            return np.empty((rows, dim), dtype=np.float32)
        return _get(self._free, self._stop)

    def give(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


def _put(channel: queue.Queue, item: Any, stop: threading.Event) -> None:
    while True:
        try:
            channel.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                raise _Stop from None


def _get(channel: queue.Queue, stop: threading.Event) -> Any:
    while True:
        try:
            return channel.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise _Stop from None


def _run(collection: Collection, kind: str, chunk_size: int, writer: IndexVersionWriter,
         apply_args: tuple, normalize_output: bool, bar: Any) -> int:
    """Correct and stage every stored vector not yet staged; returns how many were computed.

    reader thread (copy, normalising on the way) -> this thread (`_apply`) -> writer thread
    (add to the staged vectors, checkpoints). Bounded queues and buffer pools keep at most
    a few chunks in memory. An error in any stage stops the others; chunks already corrected
    are still staged before it is raised, and the failed version checkpoints them
    (:meth:`Collection.new_index_version`), so a retry keeps them.
    """
    stop = threading.Event()        # every stage stops (a failure anywhere)
    reader_stop = threading.Event()  # only the reader stops (this thread failed)
    inputs: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
    outputs: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
    in_pool = _Pool(_QUEUE_DEPTH + 2, stop)
    projection = apply_args[2] is not None
    out_pool = _Pool(_QUEUE_DEPTH + 2, stop) if projection else None
    errors: list[BaseException] = []
    done = writer.done_ids
    pause = float(os.environ.get(PAUSE_ENV) or 0)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return collection.embeddings.iter_chunks(kind, chunk_size, exclude=done, into=in_pool.take,
                                                 fill=unit_rows_into)

    def read() -> None:
        either = _Either(stop, reader_stop)
        try:
            for ids, raw in chunks():  # unit rows already (normalised while copied)
                _put(inputs, (ids, raw), either)
            _put(inputs, _DONE, either)
        except _Stop:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)
            stop.set()

    def write() -> None:
        try:
            while True:
                item = _get(outputs, stop)
                if item is _DONE:
                    return
                ids, vectors, buffer = item
                checkpoints = writer.checkpoints
                writer.add(ids, vectors, check_new=False, normalize=normalize_output)
                if out_pool is not None:
                    out_pool.give(buffer)
                bar.update(len(ids))
                if pause and writer.checkpoints > checkpoints:
                    writer.wait()  # durable
                    logger.info("checkpoint at %d vectors; pausing %.0f s (%s)", writer.count, pause, PAUSE_ENV)
                    time.sleep(pause)
        except _Stop:
            pass
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
            stop.set()

    # in copies of the caller's context: a progress bar hooked through contextvars (the web
    # UI's) follows the writer's updates
    reader = threading.Thread(target=contextvars.copy_context().run, args=(read,), name="reindex-reader",
                              daemon=True)
    sink = threading.Thread(target=contextvars.copy_context().run, args=(write,), name="reindex-writer",
                            daemon=True)
    reader.start()
    sink.start()
    out_dim = None if apply_args[2] is None else apply_args[2].shape[0]
    computed = 0
    failure: BaseException | None = None
    try:
        while True:
            item = _get(inputs, stop)
            if item is _DONE:
                break
            ids, raw = item
            buffer = None if out_pool is None else out_pool.take(chunk_size, out_dim)
            vectors = _apply(*apply_args, ids, raw, None if buffer is None else buffer[: len(raw)], True)
            in_pool.give(raw.base if raw.base is not None else raw)
            _put(outputs, (ids, vectors, buffer), stop)
            computed += len(ids)
    except _Stop:
        pass
    except BaseException as error:
        failure = error
    finally:
        reader_stop.set()
        try:  # the writer stages what is already corrected, then ends
            _put(outputs, _DONE, stop)
        except _Stop:
            pass
        sink.join()
        stop.set()
        reader.join()
    if failure is not None:
        raise failure
    if errors:
        raise errors[0]
    return computed


class _Either:
    """Looks like a threading.Event that is set when either of two events is."""

    def __init__(self, first: threading.Event, second: threading.Event) -> None:
        self._events = (first, second)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)

