"""Peak memory (and time) of `sce index import` against the size of the vectors it imports.

Writes N x d random float16 vectors in clip-retrieval's layout (``img_emb/img_emb_{i}.npy`` of
``--shard-rows`` rows and ``metadata/metadata_{i}.parquet`` with image_path, caption and one
metadata column), then imports them into a new collection in a fresh child process per
measurement, so that each peak is that run's own:

- baseline: the child imports the same modules (the interpreter, numpy, faiss, pyarrow,
  SQLAlchemy) and creates an empty collection: what every run holds before it reads anything;
- import: ``import_embeddings(..., build_index=False)``: the folder checked (every vector
  scanned for NaN/inf), the catalog rows and stored embeddings written in one transaction;
- import + index: the same, then the flat index version synced from the stored embeddings
  (as ``sce index import`` does). A flat index holds every vector in float32 in memory,
  N x d x 4 bytes, so this peak is the index's, not the import's.

Each child reports the high-water mark of its resident set (``VmHWM``, the same figure as
``resource.getrusage().ru_maxrss``) and, sampled every 20 ms by a thread, the peak of its
anonymous memory (``RssAnon``: what it allocated) apart from its file-backed pages
(``RssFile``: the memory-mapped shards, which the kernel can drop at any time). Figures are
printed as ratios against the vectors' bytes on disk (N x d x 2).

Run: OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_import.py [--n 200000] [--dim 384]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from indexing.embedding_import import DEFAULT_CHUNK_ROWS

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def status():
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return values

peak = {"RssAnon": 0, "RssFile": 0}
stop = threading.Event()

def sample():
    while not stop.is_set():
        now = status()
        for key in peak:
            peak[key] = max(peak[key], now[key])
        time.sleep(0.02)

import numpy, faiss, pyarrow, pyarrow.parquet, sqlalchemy, tqdm  # noqa: F401
from indexing.collection import Collection
from indexing.embedding_import import import_embeddings

mode, emb_dir, coll_dir, chunk_rows = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
before = status()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
seconds = 0.0
if mode == "baseline":  # an empty collection opened (catalog created), nothing read
    Collection.open(coll_dir, create=True).close()
else:
    started = time.perf_counter()
    with Collection.open(coll_dir, create=True) as collection:
        report = import_embeddings(collection, emb_dir, encoder_spec="default", progress=False,
                                   build_index=(mode == "index"), chunk_rows=chunk_rows)
        assert report.added == report.rows, report
    seconds = time.perf_counter() - started
stop.set()
thread.join()
after = status()
print(json.dumps({"before": before, "after": after, "peak": peak, "seconds": seconds}))
"""


def write_layout(root: Path, n: int, dim: int, shard_rows: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for number, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        np.save(root / "img_emb" / f"img_emb_{number}.npy", rng.standard_normal((rows, dim), dtype=np.float32)
                .astype(np.float16))
        ids = range(start, start + rows)
        pq.write_table(pa.table({
            "image_path": [f"/data/images/{i // 10000:04d}/{i:09d}.jpg" for i in ids],
            "caption": [f"a photo of thing number {i}" for i in ids],
            "source": ["bench"] * rows,
        }), root / "metadata" / f"metadata_{number}.parquet")
    return n * dim * 2


def run(mode: str, emb_dir: Path, coll_dir: Path, chunk_rows: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(emb_dir), str(coll_dir), str(chunk_rows)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help="import_embeddings' chunk_rows (rows copied and committed to the store at a time)")
    parser.add_argument("--only-import", action="store_true", help="skip the run that also syncs the index")
    args = parser.parse_args()
    mb = 1 / 2**20
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        vector_bytes = write_layout(tmp / "emb", args.n, args.dim, args.shard_rows)
        print(f"chunk_rows {args.chunk_rows}; {args.n} x {args.dim} float16 vectors in {-(-args.n // args.shard_rows)} shards of "
              f"{args.shard_rows} rows: {vector_bytes * mb:.1f} MiB on disk (written in "
              f"{time.perf_counter() - started:.1f} s); float32 index {2 * vector_bytes * mb:.1f} MiB")
        baseline = run("baseline", tmp / "emb", tmp / "unused", args.chunk_rows)
        base_hwm, base_anon = baseline["after"]["VmHWM"], baseline["peak"]["RssAnon"]
        print(f"baseline (modules loaded): VmHWM {base_hwm * mb:.1f} MiB, RssAnon {base_anon * mb:.1f} MiB")
        modes = (("import", "import (catalog + store)"), ("index", "import + flat index sync"))
        for mode, label in modes[:1] if args.only_import else modes:
            result = run(mode, tmp / "emb", tmp / f"coll-{mode}", args.chunk_rows)
            hwm = result["after"]["VmHWM"] - base_hwm
            anon = result["peak"]["RssAnon"] - base_anon
            file_pages = result["peak"]["RssFile"] - baseline["peak"]["RssFile"]
            print(f"{label:28}: {result['seconds']:6.1f} s ({args.n / result['seconds']:,.0f} rows/s); "
                  f"above baseline: VmHWM +{hwm * mb:.1f} MiB = {hwm / vector_bytes:.2f}x the vector bytes, "
                  f"RssAnon +{anon * mb:.1f} MiB = {anon / vector_bytes:.2f}x, "
                  f"RssFile peak +{file_pages * mb:.1f} MiB (mapped shard pages)")


if __name__ == "__main__":
    main()
