"""IVF index versions whose inverted lists live on disk, built shard by shard and memory-mapped.

A published IVF version is a file pair in the index folder: ``NAME.faiss`` (the coarse
quantizer, the codec and the lists' layout, written by ``faiss.write_index``) and
``NAME.<token>.ivfdata`` (the inverted lists: faiss's ``OnDiskInvertedLists``), which the
``.faiss`` file names and which is read back from the same folder
(``faiss.IO_FLAG_ONDISK_SAME_DIR``). The ids in the lists are the catalog ids (the IVF's
own ids: no ``IndexIDMap2``), so shards merge without renumbering.

Building (:func:`build_ondisk`) follows faiss's ``benchs/distributed_ondisk`` recipe with
``faiss.contrib.ondisk.merge_ondisk``: train an empty IVF on a seeded sample of the staged
vectors, fill one copy of it per shard of :data:`SHARD_ROWS` staged rows and write each shard,
then merge the shards' lists into one ``.ivfdata`` file. Every intermediate file is hidden
(``.NAME.faiss.*.staging``) and written atomically, so a killed build resumes at the first
missing shard (the trained index is kept too). The merged ``.ivfdata`` is written under a
temporary name and renamed before the ``.faiss`` file that names it is written: a ``.faiss``
file only ever names a complete ``.ivfdata`` file, and the version becomes ``ready`` after both.

Editing a published on-disk version (add or remove ids) never writes the files searches are
reading: the first change copies the lists into a new ``.ivfdata`` (:func:`copy_lists`), the
change goes there, and saving renames it and rewrites the ``.faiss`` file atomically.

``nprobe`` is tuned at build time (:func:`tune_nprobe`): sampled stored vectors are queries,
their exact top-10 over every vector (brute force) the truth, and the smallest ``nprobe``
reaching recall@10 >= :data:`TARGET_RECALL` (doubling, then bisection) is written into the
index file and recorded in the version's parameters.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from faiss.contrib.ondisk import merge_ondisk

from indexing.atomic import fsync_directory, fsync_file, write_atomically
from indexing.index_factory import gpu_count, train_size
from sce_correct.errors import NotFoundError

logger = logging.getLogger(__name__)

SHARD_ROWS = 100_000
TUNE_QUERIES = 1000
TUNE_K = 10
TARGET_RECALL = 0.95
SEED = 1234
STAGING_SUFFIX = ".staging"
IVFDATA_SUFFIX = ".ivfdata"


def is_ondisk_factory(dim: int, factory: str) -> bool:
    """Whether versions of ``factory`` are built with their lists on disk: any IVF but IVFPQR
    (which ``merge_ondisk`` refuses)."""
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        return False
    return faiss.try_extract_index_ivf(index) is not None and not isinstance(index, faiss.IndexIVFPQR)


def ondisk_lists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    """The on-disk inverted lists of ``index``, or None (not an IVF, or lists in memory)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


# -- file names ---------------------------------------------------------------------------------
def ivfdata_files(index_file: Path) -> list[Path]:
    """Every ``.ivfdata`` file of the version whose index file is ``index_file``."""
    if not index_file.parent.is_dir():
        return []
    return sorted(index_file.parent.glob(f"{index_file.stem}.*{IVFDATA_SUFFIX}"))


def _new_lists_file(index_file: Path) -> Path:
    """A new, hidden, temporary lists file; :func:`commit` renames it ``NAME.<token>.ivfdata``."""
    return index_file.with_name(f".{index_file.name}.{uuid.uuid4().hex[:8]}{IVFDATA_SUFFIX}.partial")


def _final_name(index_file: Path, lists_file: Path) -> Path:
    token = lists_file.name[len(f".{index_file.name}."):].split(".")[0]
    return index_file.with_name(f"{index_file.stem}.{token}{IVFDATA_SUFFIX}")


def _staging(index_file: Path, part: str) -> Path:
    return index_file.with_name(f".{index_file.name}.{part}{STAGING_SUFFIX}")


# -- reading and saving ---------------------------------------------------------------------------
def read(path: Path) -> faiss.Index:
    """An index file; on-disk lists are memory-mapped read-only from the file's own folder.

    The ``.faiss`` file names its lists by absolute path (:func:`commit`), which is read as is;
    only a moved or copied collection's (another folder) is read again with
    ``IO_FLAG_ONDISK_SAME_DIR``, which finds them beside the file (and prints a line: faiss).
    """
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY)
        lists = ondisk_lists(index)
        if lists is None or Path(lists.filename).parent == Path(path).absolute().parent:
            return index
        del lists, index
    except RuntimeError:  # the named lists file is not there: a moved collection
        pass
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise NotFoundError(f"cannot read index file {path} (or the .ivfdata lists beside it): {reason}") from error


@contextlib.contextmanager
def faiss_stdout_to_stderr():
    """C-level stdout goes to stderr while this is open. ``OnDiskInvertedLists`` prints
    "resizing FILE to N bytes" with ``printf`` each time its lists file grows (unconditionally;
    no verbose flag governs it), which would mix into a command's output on stdout (a table, a
    JSON line). The C buffer is flushed before fd 1 is put back, so nothing printed inside
    reaches stdout later."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def copy_lists(index: faiss.Index, index_file: Path) -> Path:
    """Give ``index`` a writable copy of its on-disk lists in a new temporary file (its path
    is returned; :func:`commit` renames it): a change never writes the published file."""
    ivf = faiss.extract_index_ivf(index)
    temporary = _new_lists_file(index_file)
    copy = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(temporary))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(ivf.invlists)
    with faiss_stdout_to_stderr():
        copy.merge_from_multiple(sources.data(), sources.size(), False)
    ivf.replace_invlists(copy, True)
    copy.this.disown()
    return temporary


def commit(index: faiss.Index, index_file: Path, lists_file: Path | None, keep: str | None = None) -> None:
    """Make ``index`` the version's file pair: rename its new lists file ``lists_file`` (if
    any) into place, write the ``.faiss`` file naming it atomically, then remove the version's
    other ``.ivfdata`` files but ``keep`` (the name the replaced ``.faiss`` file gave: a search
    that read that file just before may still open it; the next change or gc removes it)."""
    index_file = Path(index_file).absolute()
    lists = ondisk_lists(index)
    assert lists is not None
    if lists_file is not None:
        final = _final_name(index_file, lists_file)
        fsync_file(lists_file)
        os.replace(lists_file, final)
        fsync_directory(final.parent)
        lists.filename = str(final)
    current = Path(lists.filename).name
    write_atomically(index_file, lambda temporary: faiss.write_index(index, str(temporary)))
    for path in ivfdata_files(index_file):
        if path.name not in (current, keep):
            path.unlink(missing_ok=True)


def list_ids(index: faiss.Index) -> np.ndarray:
    """The ids held in an IVF's inverted lists, list by list."""
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            parts.append(faiss.rev_swig_ptr(pointer, size).copy())
            lists.release_ids(number, pointer)
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)


# -- building -----------------------------------------------------------------------------------
def _rows_at(staged, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The staged (ids, rows) at sorted ``positions``."""
    ids_out, rows_out, start = [], [], 0
    for ids, rows in staged.chunks():
        stop = start + len(ids)
        lo, hi = np.searchsorted(positions, [start, stop])
        if hi > lo:
            local = positions[lo:hi] - start
            ids_out.append(ids[local])
            rows_out.append(np.array(rows[local], dtype=np.float32))
        start = stop
    return np.concatenate(ids_out), np.ascontiguousarray(np.concatenate(rows_out))


def _sample_positions(count: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, size=min(size, count), replace=False))


def train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train the IVF on ``sample``; with a GPU its k-means assignment runs there."""
    ivf = faiss.extract_index_ivf(index)
    if gpu_count() > 0:  # pragma: no cover - no GPU on the machines this was tested on
        logger.info("training the coarse quantizer on %d GPU(s)", gpu_count())
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(sample)


def _shards(staged, index_file: Path) -> Iterator[tuple[Path, int, int]]:
    count = staged.count
    for start in range(0, count, SHARD_ROWS):
        rows = min(SHARD_ROWS, count - start)
        yield _staging(index_file, f"shard-{start}-{rows}"), start, rows


def build_ondisk(index_file: Path, factory: str, staged) -> tuple[faiss.Index, Path, dict[str, Any]]:
    """Train, fill shard by shard and merge an on-disk IVF of the staged vectors (module doc).

    Returns the index (lists merged into a temporary ``.ivfdata`` file, for :func:`commit`),
    that file, and what the build recorded (train size, timings); nothing is published.
    """
    dim, count = staged.dim, staged.count
    timings: dict[str, float] = {}
    trained_file = _staging(index_file, "trained")
    started = time.perf_counter()
    if trained_file.exists():
        trained = faiss.read_index(str(trained_file))
        sample_size = train_size(faiss.extract_index_ivf(trained).nlist, count)
    else:
        trained = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        nlist = faiss.extract_index_ivf(trained).nlist
        sample_size = train_size(nlist, count)
        _, sample = _rows_at(staged, _sample_positions(count, sample_size, SEED))
        train(trained, sample)
        del sample
        write_atomically(trained_file, lambda temporary: faiss.write_index(trained, str(temporary)))
    timings["train_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    shard_files = list(_shards(staged, index_file))
    wanted = {start: (path, rows) for path, start, rows in shard_files if not path.exists()}
    if wanted:
        _fill_shards(trained, staged, wanted)
    timings["add_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    lists_file = _new_lists_file(index_file)
    with faiss_stdout_to_stderr():
        merge_ondisk(trained, [str(path) for path, _, _ in shard_files], str(lists_file))
    timings["merge_seconds"] = time.perf_counter() - started
    return trained, lists_file, {"train_size": sample_size, "shards": len(shard_files),
                                 **{key: round(value, 3) for key, value in timings.items()}}


def _fill_shards(trained: faiss.Index, staged, wanted: dict[int, tuple[Path, int]]) -> None:
    position, shard, shard_start = 0, None, None
    for ids, rows in staged.chunks():
        offset = 0
        while offset < len(ids):
            here = position + offset
            start = here - here % SHARD_ROWS
            take = min(len(ids) - offset, start + SHARD_ROWS - here)
            if start in wanted:
                if shard_start != start:
                    shard, shard_start = faiss.clone_index(trained), start
                shard.add_with_ids(np.ascontiguousarray(rows[offset:offset + take], dtype=np.float32),
                                   np.ascontiguousarray(ids[offset:offset + take]))
                path, expected = wanted[start]
                if shard.ntotal == expected:
                    write_atomically(path, lambda temporary, s=shard: faiss.write_index(s, str(temporary)))
                    shard, shard_start = None, None
            offset += take
        position += len(ids)


def remove_staging(index_file: Path) -> None:
    """Delete the trained index and the shards of a build (after it is published)."""
    for path in index_file.parent.glob(f".{index_file.name}.*{STAGING_SUFFIX}"):
        path.unlink(missing_ok=True)


def staging_names(index_file: Path) -> set[str]:
    return {path.name for path in index_file.parent.glob(f".{index_file.name}.*{STAGING_SUFFIX}")}


# -- nprobe -------------------------------------------------------------------------------------
def recall_at(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
              nprobe: int, k: int) -> float:
    """recall@k of ``index`` at ``nprobe`` for stored vectors as queries, each one's own id
    left out of what it finds (``truth``: the exact top k of the others)."""
    faiss.extract_index_ivf(index).nprobe = int(nprobe)
    _, found = index.search(queries, k + 1)
    hits = sum(len(np.intersect1d(_without(row, own, k), want)) for row, own, want in zip(found, query_ids, truth))
    return hits / truth.size


def _without(row: np.ndarray, own: int, k: int) -> np.ndarray:
    return row[row != own][:k]


def tune_nprobe(index: faiss.Index, staged, *, queries: int = TUNE_QUERIES, k: int = TUNE_K,
                target: float = TARGET_RECALL, seed: int = SEED + 1) -> dict[str, Any]:
    """The smallest nprobe whose recall@k on sampled stored vectors reaches ``target``.

    The truth is the exact top-k over every staged vector (``knn_ground_truth``, brute force
    block by block) but the query itself (leave one out: a stored vector finds itself in the
    first list probed, which would make a held-in estimate optimistic); nprobe doubles until the target is met, then bisection finds the
    smallest value between the last two. When even nprobe = nlist misses the target (coarse
    codes: SQ/PQ), the smallest nprobe within 0.01 of that best recall is taken.
    """
    nlist = faiss.extract_index_ivf(index).nlist
    k = max(1, min(k, staged.count - 1))
    started = time.perf_counter()
    positions = _sample_positions(staged.count, queries, seed)
    _, xq = _rows_at(staged, positions)
    all_ids = staged.ids()

    def blocks() -> Iterator[np.ndarray]:
        for _, rows in staged.chunks():
            yield np.ascontiguousarray(rows, dtype=np.float32)

    _, truth_positions = knn_ground_truth(xq, blocks(), k + 1, metric_type=faiss.METRIC_INNER_PRODUCT,
                                          ngpu=min(gpu_count(), 1) if gpu_count() else 0)
    query_ids = all_ids[positions]
    truth = np.array([_without(row, own, k) for row, own in zip(all_ids[truth_positions], query_ids)])
    measured: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in measured:
            measured[nprobe] = recall_at(index, xq, query_ids, truth, nprobe, k)
        return measured[nprobe]

    nprobe = 1
    while nprobe < nlist and recall(nprobe) < target:
        nprobe = min(nprobe * 2, nlist)
    goal = target
    if recall(nprobe) < target:  # nprobe == nlist: the codes cap the recall
        goal = recall(nlist) - 0.01
        logger.warning("recall@%d is %.3f even with nprobe = nlist = %d: the index's codes are too coarse "
                       "for %.2f; tuning for %.3f", k, recall(nlist), nlist, target, goal)
        nprobe = 1
        while nprobe < nlist and recall(nprobe) < goal:
            nprobe = min(nprobe * 2, nlist)
    low, high = nprobe // 2 + 1, nprobe  # recall(nprobe // 2) < goal (or nprobe == 1)
    while low < high:
        middle = (low + high) // 2
        if recall(middle) >= goal:
            high = middle
        else:
            low = middle + 1
    faiss.extract_index_ivf(index).nprobe = high
    return {"nprobe": int(high), "tuned_recall_at_10" if k == 10 else f"tuned_recall_at_{k}": round(recall(high), 4),
            "tune_queries": int(len(xq)), "tune_seconds": round(time.perf_counter() - started, 3),
            "nlist": int(nlist)}
