"""Indexing benchmarks: encoding throughput, FAISS search speed and IVF recall.

    .venv/bin/python benchmarks/bench_index.py [--images 256] [--vectors 100000] [--dim 384]

1. Images/s of the default encoder end to end from files (the indexing pipeline: read,
   hash, decode, preprocess in threads, encode, write catalog + store + index; and the
   encoder's own ``encode_images`` on paths) against the model alone on tensors that were
   decoded and preprocessed beforehand, in the same run.
2. Search QPS of the FAISS flat inner-product index against a numpy brute force on random
   vectors, checking that both return the same ids.
3. Recall@10 and QPS of an IVF factory string (default "IVF256,Flat", nprobe 16) against
   flat, on unstructured Gaussian vectors (the worst case for IVF) and on clustered ones
   (closer to real embeddings).

Keeps under about 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexing.vector_index import VectorIndex, unit_rows  # noqa: E402

SAMPLE_IMAGES = REPO / "data" / "sample" / "images"


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def bench_encoder(images: int, batch_size: int, workers: int) -> None:
    print(f"== 1. default encoder throughput ({images} sample images, batch {batch_size}, "
          f"{workers} decode threads)")
    paths = sorted(SAMPLE_IMAGES.glob("*.png"))[:images]
    if not paths:
        print("   skipped: no sample images under data/sample/images")
        return
    try:
        import torch
        from PIL import Image

        from indexing.encoders import load_encoder

        encoder = load_encoder("default")
        warm_up = [encoder.preprocess(Image.open(path)) for path in paths[:batch_size]]
        encoder.encode_image_batch(torch.stack(warm_up))  # loads the weights
    except Exception as error:  # the encoder (or its weights) is not available here
        print(f"   skipped: the default encoder cannot run: {type(error).__name__}: {error}")
        return
    from indexing.pipeline import build_collection

    with tempfile.TemporaryDirectory() as directory:
        report, pipeline_seconds = timed(
            build_collection, SAMPLE_IMAGES if images >= len(list(SAMPLE_IMAGES.glob("*.png")))
            else _listing(paths, Path(directory)), Path(directory) / "coll", encoder=encoder,
            batch_size=batch_size, workers=workers, progress=False,
        )
    indexed = report.added + sum(report.rejected.values())
    _, encode_images_seconds = timed(encoder.encode_images, paths, batch_size=batch_size,
                                     num_workers=workers)
    tensors = [encoder.preprocess(Image.open(path)) for path in paths]  # decoded beforehand
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    started = time.perf_counter()
    for batch in batches:
        encoder.encode_image_batch(batch)
    model_seconds = time.perf_counter() - started
    model_rate = len(paths) / model_seconds
    pipeline_rate = indexed / pipeline_seconds
    encode_images_rate = len(paths) / encode_images_seconds
    print(f"   pipeline (files -> catalog + index): {pipeline_rate:8.1f} images/s")
    print(f"   encoder.encode_images(paths):        {encode_images_rate:8.1f} images/s")
    print(f"   model alone on decoded tensors:      {model_rate:8.1f} images/s")
    print(f"   ratio pipeline / model alone:        {pipeline_rate / model_rate:8.2f}")
    print(f"   ratio encode_images / model alone:   {encode_images_rate / model_rate:8.2f}")


def _listing(paths: list[Path], directory: Path) -> Path:
    listing = directory / "subset.csv"
    listing.write_text("file\n" + "".join(f"{path}\n" for path in paths), encoding="utf-8")
    return listing


def numpy_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact top-k ids by inner product, a chunk of queries at a time."""
    result = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ vectors.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        result[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return result


def bench_search(count: int, dim: int, queries: int, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    print(f"== 2. flat search: {count} random {dim}-d vectors, {queries} queries, k={k}")
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng.standard_normal((count, dim), dtype=np.float32))
    query_vectors = unit_rows(rng.standard_normal((queries, dim), dtype=np.float32))
    ids = np.arange(count, dtype=np.int64)
    index = VectorIndex.create(dim)
    _, add_seconds = timed(index.add, ids, vectors, check_new=False)
    (_, faiss_ids), faiss_seconds = timed(index.search, query_vectors, k)
    numpy_ids, numpy_seconds = timed(numpy_top_k, query_vectors, vectors, k)
    same = float(np.mean(np.all(faiss_ids == numpy_ids, axis=1)))
    faiss_qps, numpy_qps = queries / faiss_seconds, queries / numpy_seconds
    print(f"   add {count} vectors:   {add_seconds:6.2f} s")
    print(f"   faiss flat:           {faiss_qps:10.0f} queries/s")
    print(f"   numpy brute force:    {numpy_qps:10.0f} queries/s")
    print(f"   ratio faiss / numpy:  {faiss_qps / numpy_qps:10.2f}")
    print(f"   identical top-{k} id lists: {same:.1%}")
    if same < 0.99:
        raise SystemExit("faiss and numpy disagree on more than 1% of queries")
    return vectors, query_vectors, faiss_ids


def bench_ivf(vectors: np.ndarray, queries: np.ndarray, flat_ids: np.ndarray, factory: str,
              nprobe: int, label: str, k: int = 10) -> None:
    index = VectorIndex.create(vectors.shape[1], factory)
    sample = vectors[np.random.default_rng(1).choice(len(vectors), min(len(vectors), 50_000), replace=False)]
    _, train_seconds = timed(index.train, sample)
    index.add(np.arange(len(vectors)), vectors, check_new=False)
    index.set_nprobe(nprobe)
    (_, ivf_ids), ivf_seconds = timed(index.search, queries, k)
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ivf_ids, flat_ids)])
    flat = VectorIndex.create(vectors.shape[1])
    flat.add(np.arange(len(vectors)), vectors, check_new=False)
    _, flat_seconds = timed(flat.search, queries, k)
    print(f"   {label:10} recall@{k} {recall:6.3f}   IVF {len(queries) / ivf_seconds:8.0f} q/s   "
          f"flat {len(queries) / flat_seconds:8.0f} q/s   speed-up {flat_seconds / ivf_seconds:5.1f}x   "
          f"(train {train_seconds:.1f} s)")


def clustered_vectors(count: int, dim: int, clusters: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    spread = 1.0 / np.sqrt(dim)  # noise as long as the centre: clusters overlap

    def draw(n: int) -> np.ndarray:
        labels = rng.integers(0, clusters, n)
        noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(spread * np.sqrt(dim))
        return unit_rows(centres[labels] + noise)

    return draw(count), draw(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--factory", default="IVF256,Flat")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--skip-encoder", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("indexing").setLevel(logging.ERROR)  # rejected-file warnings are noise here

    started = time.perf_counter()
    if not args.skip_encoder:
        bench_encoder(args.images, args.batch_size, args.workers)
    vectors, queries, flat_ids = bench_search(args.vectors, args.dim, args.queries)
    print(f"== 3. {args.factory} with nprobe {args.nprobe} vs flat ({args.vectors} x {args.dim})")
    bench_ivf(vectors, queries, flat_ids, args.factory, args.nprobe, "gaussian")
    clustered, clustered_queries = clustered_vectors(args.vectors, args.dim, 1000, args.queries)
    flat = VectorIndex.create(args.dim)
    flat.add(np.arange(len(clustered)), clustered, check_new=False)
    _, clustered_flat_ids = flat.search(clustered_queries, 10)
    bench_ivf(clustered, clustered_queries, clustered_flat_ids, args.factory, args.nprobe, "clustered")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
