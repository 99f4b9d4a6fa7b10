"""Indexes bigger than memory: import, `--factory auto` build, tuned nprobe, recall and latency.

N vectors of dimension D (default 1,000,000 x 384) are drawn from a seeded Gaussian mixture
in a 32-d latent space mapped into D dimensions, plus noise, unit-normed (:func:`mixture_shard`;
pure uniform random vectors have no neighbours worth the name, so IVF recall on them means
nothing), shard by shard. Stages, each in its own process so
that its peak memory (ru_maxrss, from os.wait4) is its own:

1. import: the shards are first written in clip-retrieval's layout (img_emb/img_emb_{i}.npy +
   metadata/metadata_{i}.parquet, by a separate process), then imported with
   ``indexing.embedding_import.import_embeddings`` (``sce index import``).
2. build: ``Collection.sync_index("image", "auto[:BUDGET]")``: the factory chosen by
   ``indexing.index_factory.choose_factory``, an on-disk IVF trained on a sample, filled shard
   by shard, merged (``merge_ondisk``) and its nprobe tuned on 1,000 stored vectors.
3. search: Q held-out queries from the same mixture (not stored), one at a time through
   ``retrieval.search.Retriever`` with the recorded nprobe: p50/p95 ms per query and recall@10
   against the exact top 10 (brute force over every stored vector, ``knn_ground_truth``); the
   baseline in the same process is exact single-query search (brute force, a few queries).
   Also p50 and recall at nprobe/2 and 2 nprobe (search time vs nprobe, for the README model).

Run: OPENBLAS_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py --n 1000000
Goals (issue 13): recall@10 >= 0.95, p50 <= 10 ms, import peak memory below the vectors' size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARD = 25_000  # vectors generated, written and imported at a time


def mixture_shard(index: int, rows: int, args) -> np.ndarray:
    """Shard ``index`` of the data: a Gaussian mixture (``args.centers`` means, spread 0.5) in
    an ``args.latent``-d space, mapped linearly into ``args.dim`` dimensions, plus isotropic
    noise (0.05), unit-normed. Neighbours then live on a low-dimensional structure as with
    real embeddings: an isotropic mixture in 384-d is either trivially separable (nprobe 1
    finds everything) or without neighbours worth the name (recall flat in nprobe)."""
    base = np.random.default_rng(args.seed)
    means = base.standard_normal((args.centers, args.latent)).astype(np.float32)
    lift = base.standard_normal((args.latent, args.dim)).astype(np.float32) / np.sqrt(args.latent)
    rng = np.random.default_rng([args.seed, index])
    z = means[rng.integers(0, args.centers, rows)]
    z += 0.5 * rng.standard_normal((rows, args.latent), dtype=np.float32)
    x = z @ lift
    x += 0.05 * rng.standard_normal((rows, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def shards(args) -> list[tuple[int, int]]:
    return [(i, min(SHARD, args.n - start)) for i, start in enumerate(range(0, args.n, SHARD))]


# -- stages (each run in a child process) ----------------------------------------------------------
def stage_write_layout(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(args.work) / "clip"
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for i, rows in shards(args):
        start = i * SHARD
        np.save(root / "img_emb" / f"img_emb_{i}.npy", mixture_shard(i, rows, args))
        names = [f"synthetic/{j:08d}.jpg" for j in range(start, start + rows)]
        pq.write_table(pa.table({"image_path": names, "caption": [f"vector {j}" for j in range(start, start + rows)]}),
                       root / "metadata" / f"metadata_{i}.parquet")
    return {}


def stage_import(args) -> dict:
    from indexing.collection import Collection
    from indexing.embedding_import import import_embeddings

    started = time.perf_counter()
    with Collection.open(Path(args.work) / "coll", create=True) as coll:
        import_embeddings(coll, Path(args.work) / "clip", encoder_spec=args.encoder_spec, progress=False,
                          build_index=False)  # the index is the next stage
        count = coll.embeddings.count("image")
    return {"import_via": "indexing.embedding_import.import_embeddings (clip-retrieval layout)",
            "import_seconds": time.perf_counter() - started, "stored": count}


def stage_build(args) -> dict:
    from indexing.collection import Collection

    spec = "auto" + (f":{args.memory_budget}" if args.memory_budget else "")
    started = time.perf_counter()
    with Collection.open(Path(args.work) / "coll") as coll:
        info = coll.sync_index("image", spec)
    seconds = time.perf_counter() - started
    lists = sorted(info.file.parent.glob(f"{info.file.stem}.*.ivfdata"))
    disk = info.file.stat().st_size + sum(p.stat().st_size for p in lists)
    return {"build_seconds": seconds, "factory": info.factory, "parameters": info.parameters,
            "index_bytes_on_disk": disk, "count": info.count}


def stage_search(args) -> dict:
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    from indexing.collection import Collection
    from retrieval.search import Retriever

    queries = mixture_shard(10_000_000, args.queries, args)  # not stored
    with Collection.open(Path(args.work) / "coll") as coll:
        info = coll.current_version("image")
        stored_ids = []

        def blocks():
            for ids, rows in coll.embeddings.iter_chunks("image", 65536):
                stored_ids.append(np.array(ids))
                yield np.ascontiguousarray(rows, dtype=np.float32)

        started = time.perf_counter()
        _, positions = knn_ground_truth(queries, blocks(), 10, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
        exact_batch_ms = (time.perf_counter() - started) * 1000 / len(queries)
        truth = np.concatenate(stored_ids)[positions]
        # the baseline: exact search of a single query (a brute-force pass over every vector)
        single = []
        for q in queries[: args.exact_queries]:
            started = time.perf_counter()
            knn_ground_truth(q[None], (np.ascontiguousarray(r, dtype=np.float32)
                                       for _, r in coll.embeddings.iter_chunks("image", 65536)), 10,
                             metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
            single.append((time.perf_counter() - started) * 1000)

        class Vectors:  # the stored vectors' "encoder": queries are given as vectors
            name, dim = info.encoder, args.dim

        retriever = Retriever(coll, Vectors())
        tuned = info.parameters.get("nprobe")
        rows = {}
        for label, nprobe in [("tuned", None), ("half", max(1, (tuned or 2) // 2)), ("double", (tuned or 1) * 2)]:
            if tuned is None and label != "tuned":
                continue
            times, found = [], []
            for q in queries:
                started = time.perf_counter()
                hits = retriever.search(q, 10, nprobe=nprobe).hits
                times.append((time.perf_counter() - started) * 1000)
                found.append([h.item_id for h in hits])
            hit = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
            rows[label] = {"nprobe": nprobe or tuned, "p50_ms": float(np.percentile(times, 50)),
                           "p95_ms": float(np.percentile(times, 95)), "recall_at_10": hit / truth.size}
    return {"search": rows, "exact_single_ms": float(np.median(single)), "exact_batched_ms": exact_batch_ms}


STAGES = {"write_layout": stage_write_layout, "import": stage_import, "build": stage_build, "search": stage_search}


def run_stage(name: str, argv: list[str]) -> dict:
    """Run one stage in a child process; its result and its own peak RSS (os.wait4)."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, __file__, *argv, "--stage", name, "--out", str(out)], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"stage {name} failed with status {child.returncode}")
    result = json.loads(out.read_text())
    out.unlink()
    result[f"{name}_peak_rss_bytes"] = usage.ru_maxrss * 1024  # kB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--centers", type=int, default=100, help="mixture components")
    parser.add_argument("--latent", type=int, default=32, help="dimension the mixture lives in")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=5, help="single exact searches (the baseline)")
    parser.add_argument("--memory-budget", default=None, help="for --factory auto (default: half the free RAM)")
    parser.add_argument("--encoder-spec", default="none", help="the encoder spec the import records")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        result = STAGES[args.stage](args)
        Path(args.out).write_text(json.dumps(result))
        return
    import shutil

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    argv = [a for a in sys.argv[1:]] + (["--work", str(work)] if not args.work else [])
    try:
        results: dict = {}
        run_stage("write_layout", argv)
        for name in ("import", "build", "search"):
            results.update(run_stage(name, argv))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    vector_bytes = args.n * args.dim * 4
    p = results["parameters"]
    tuned = results["search"]["tuned"]
    print(f"bench_scale: {args.n:,} x {args.dim} vectors ({vector_bytes / 1e9:.2f} GB float32), "
          f"{args.centers} mixture centres in {args.latent}-d, seed {args.seed}, {os.cpu_count()} cores")
    print(f"import:  {results['import_via']}")
    print(f"         {results['import_seconds']:.1f} s, peak RSS {results['import_peak_rss_bytes'] / 1e9:.3f} GB "
          f"({results['import_peak_rss_bytes'] / vector_bytes:.2f}x the vectors)")
    print(f"build:   auto -> {results['factory']} in {results['build_seconds']:.1f} s "
          f"(train {p.get('train_seconds', 0):.1f} s on {p.get('train_size', 0):,} vectors, add "
          f"{p.get('add_seconds', 0):.1f} s, merge {p.get('merge_seconds', 0):.1f} s, tune {p.get('tune_seconds', 0):.1f} s), "
          f"peak RSS {results['build_peak_rss_bytes'] / 1e9:.3f} GB, index on disk "
          f"{results['index_bytes_on_disk'] / 1e9:.3f} GB ({results['index_bytes_on_disk'] / args.n:.0f} B/vector)")
    if "nprobe" in p:
        print(f"         tuned nprobe {p['nprobe']} of nlist {p['nlist']} (recall@10 {p['tuned_recall_at_10']:.3f} on "
              f"{p['tune_queries']} stored vectors)")
    print(f"search:  {args.queries} held-out queries, one at a time through Retriever "
          f"(peak RSS {results['search_peak_rss_bytes'] / 1e9:.3f} GB)")
    for label, row in results["search"].items():
        print(f"         nprobe {str(row['nprobe'] or '-'):>4} ({label:6}): recall@10 {row['recall_at_10']:.4f}  "
              f"p50 {row['p50_ms']:.2f} ms  p95 {row['p95_ms']:.2f} ms")
    print(f"baseline: exact single-query search {results['exact_single_ms']:.1f} ms "
          f"(batched {results['exact_batched_ms']:.2f} ms/query); tuned IVF p50 is "
          f"{results['exact_single_ms'] / tuned['p50_ms']:.0f}x faster")
    goals = {"recall@10 >= 0.95": tuned["recall_at_10"] >= 0.95, "p50 <= 10 ms": tuned["p50_ms"] <= 10,
             "import peak < vectors": results["import_peak_rss_bytes"] < vector_bytes}
    print("goals:   " + ", ".join(f"{goal}: {'met' if ok else 'MISSED'}" for goal, ok in goals.items()))


if __name__ == "__main__":
    main()
