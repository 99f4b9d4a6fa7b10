"""Batch re-index speed: `retrieval.reindex` with a projection vs the floor, in one process.

A collection of N random 512-d vectors (default 1M) is written to a temporary collection
(catalog rows and stored embeddings; no images). Then:
- reindex: `retrieval.reindex.reindex` with a projection correction, reading the stored
  embeddings in chunks and publishing a new flat index version. Corrected vectors are added
  to the version's in-memory IndexIDMap2 (flat) as they are computed; at each checkpoint
  the vectors added since the last one are saved as a segment (np.save of the rows and the
  ids, fsync'ed, then an atomically written progress record: what a killed job resumes
  from); publishing is one faiss.write_index of the whole index to a temporary file,
  fsync'ed and renamed. Run once with the default checkpoints (every 200k vectors; none once
  every vector is staged, since publishing follows) and once with no checkpoint at all;
- floor: one matmul X P' on the vectors already in memory plus one add to a flat
  IndexIDMap2 (no disk, no catalog). The ratios are against it;
- floor + write: the floor plus one atomic faiss.write_index of its index (what any
  published flat index costs at least), for reference.
Each round times all three; the first one in a process also pays for memory the machine
has not touched yet (on a virtual machine the host backs such pages first), so it runs
--rounds rounds (default 2) and prints each.

Run: OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reindex.py [--n 1000000]
Goal (issue 12): the default, resumable configuration within 1.5x of the floor.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from indexing.collection import Collection, NewItem
from indexing.correction_store import save_correction
from indexing.vector_index import VectorIndex, unit_rows
from retrieval.reindex import reindex
from sce_correct import SchurCorrector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        coll = Collection.open(Path(tmp) / "coll", create=True)
        coll.bind_encoder("bench-random", args.dim)
        t0 = time.perf_counter()
        for start in range(0, args.n, args.chunk):
            m = min(args.chunk, args.n - start)
            items = [NewItem(uri=f"mem://{start + i}", sha256=hashlib.sha256(str(start + i).encode()).hexdigest(),
                             width=1, height=1) for i in range(m)]
            coll.add_items(items, rng.standard_normal((m, args.dim), dtype=np.float32))
        print(f"set-up: {args.n} items stored in {time.perf_counter() - t0:.1f} s")
        # A projection learned from random preliminary pairs (what it removes does not matter here).
        T = rng.standard_normal((500, args.dim))
        corr = SchurCorrector().fit(T, T @ rng.standard_normal((args.dim, args.dim)) * 0.1 + rng.standard_normal((500, args.dim)))
        save_correction(coll, "bench", corr, encoder="bench-random", dim=args.dim,
                        parameters={"mode": "nullify", "n_components": 16, "concept_vector": [0.0] * args.dim})

        P = corr.projection(n_components=16).astype(np.float32)
        for number in range(1, args.rounds + 1):
            _round(coll, P, args.n, args.dim, Path(tmp), number)
        coll.close()


def _round(coll: Collection, P: np.ndarray, n: int, dim: int, tmp: Path, number: int) -> None:
    t0 = time.perf_counter()
    v = reindex(coll, "bench", progress=False, factory="Flat")
    t_reindex = time.perf_counter() - t0
    t0 = time.perf_counter()
    v2 = reindex(coll, "bench", progress=False, checkpoint_every=n + 1, factory="Flat")
    t_reindex_1 = time.perf_counter() - t0
    assert v.count == v2.count == n

    ids = coll.embeddings.ids("image")
    X = unit_rows(coll.embeddings.get("image", ids))
    t0 = time.perf_counter()
    Y = X @ P.T
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(Y, ids)
    t_floor = time.perf_counter() - t0
    del X, Y
    t0 = time.perf_counter()
    VectorIndex(index).save(tmp / "floor.faiss")  # faiss.write_index, fsync, rename
    t_write = time.perf_counter() - t0
    (tmp / "floor.faiss").unlink()
    coll.remove_retired_files()
    t_floor_write = t_floor + t_write
    print(f"round {number}")
    print(f"  floor (X P' + flat add, in memory)        {t_floor:7.2f} s")
    print(f"  floor + one atomic write_index            {t_floor_write:7.2f} s   {t_floor_write / t_floor:5.2f}x the floor")
    print(f"  reindex, checkpoints every 200k vectors   {t_reindex:7.2f} s   {t_reindex / t_floor:5.2f}x the floor"
          f"   ({t_reindex / t_floor_write:4.2f}x floor + write)")
    print(f"  reindex, no checkpoint                    {t_reindex_1:7.2f} s   {t_reindex_1 / t_floor:5.2f}x the floor"
          f"   ({t_reindex_1 / t_floor_write:4.2f}x floor + write)", flush=True)


if __name__ == "__main__":
    main()
