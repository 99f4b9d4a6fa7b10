"""Speed of sce_score and SchurCorrector.fit against baselines timed in the same process.

(a) reference style: per-sample outer products summed in a Python loop, then pinv (the
    seed's way). For the Gaussian kernel it is timed on a subsample and scaled linearly in n,
    since its loop is linear in n and the full run would take most of an hour.
(b) the floor: the three covariance products of the feature matrices, Phi_T'Phi_T,
    Phi_I'Phi_I and Phi_T'Phi_I, in the features' precision (float32 for float32 cosine
    input, as the package computes them), plus one symmetric eigendecomposition (eigenvalues
    and eigenvectors) of a D x D float64 matrix. Every score and fit needs all three products;
    the score needs three eigenvalue-only decompositions (C_I, R, S), the fit one full one.
    The ratio against a floor of the image product Phi_I'Phi_I alone plus one
    eigendecomposition is printed too (no method can reach it: it skips two thirds of the
    products).
(c) the streaming forms (sce_score_batches, SchurCorrector.fit_batches) over --batch-rows
    row batches, against the same floor.

Every time is the best of --repeat runs (the reference: one run). BLAS threads are fixed
with threadpoolctl (--threads, default 1), so OPENBLAS_NUM_THREADS does not matter.
``--clock cpu`` times the process's CPU time instead of the wall clock: on a machine shared
with other jobs it counts the work done rather than the time waited for a core (with one
BLAS thread the two agree on an idle machine).

Run: .venv/bin/python benchmarks/bench_sce.py [--n 10000] [--dim 512] [--rff-dim 2500] [--kernels cosine]
Goals: >= 50x faster than (a) (issue 3); within 1.5x of (b) (issue 13).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import sce_correct as sc


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def reference_style(phi_t, phi_i):
    """The seed's way: per-sample outer products in a loop, pinv, then eigenvalues."""
    D = phi_t.shape[1]
    C_T, C_I, C_TI = np.zeros((D, D)), np.zeros((D, D)), np.zeros((D, D))
    for t, x in zip(phi_t, phi_i):
        C_T += np.outer(t, t)
        C_I += np.outer(x, x)
        C_TI += np.outer(t, x)
    n = len(phi_t)
    C_T, C_I, C_TI = C_T / n, C_I / n, C_TI / n
    gamma = np.linalg.pinv(C_T) @ C_TI
    S = C_I - C_TI.T @ gamma
    return np.linalg.eigvalsh(S), np.linalg.eigvalsh(C_I)


def floor(phi_t, phi_i):
    """The three covariance products and one symmetric eigendecomposition."""
    n = len(phi_t)
    phi_t.T @ phi_t
    C_I = (phi_i.T @ phi_i).astype(np.float64) / n
    phi_t.T @ phi_i
    return np.linalg.eigh(C_I)


def floor_image_only(phi_i):
    C = (phi_i.T @ phi_i).astype(np.float64) / len(phi_i)
    return np.linalg.eigh(C)


def batches(T, I, rows):
    return ((T[i:i + rows], I[i:i + rows]) for i in range(0, len(T), rows))


def bench(kernel, n, d, rff_dim, ref_subsample, repeat, batch_rows):
    rng = np.random.default_rng(0)
    T = rng.normal(size=(n, d)).astype(np.float32)
    I = (0.7 * T @ (rng.normal(size=(d, d)) / np.sqrt(d)) + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    kw = dict(kernel=kernel, rff_dim=rff_dim, sigma=None if kernel == "cosine" else float(np.sqrt(2 * d)))
    fmap = sc.CosineFeatures() if kernel == "cosine" else sc.RandomFourierFeatures(
        sigma=kw["sigma"], n_components=rff_dim)
    fmap.fit(np.vstack([T, I]))
    phi_t, phi_i = fmap.transform(T), fmap.transform(I)
    D = phi_t.shape[1]

    t_floor = timed(lambda: floor(phi_t, phi_i), repeat)
    t_floor_img = timed(lambda: floor_image_only(phi_i), repeat)
    rows = [("sce_score", timed(lambda: sc.sce_score(T, I, **kw), repeat)),
            ("SchurCorrector.fit", timed(lambda: sc.SchurCorrector(**kw).fit(T, I), repeat))]
    if hasattr(sc, "sce_score_batches"):  # absent before issue 13: the bench also runs on older code
        rows += [(f"sce_score_batches ({batch_rows} rows)",
                  timed(lambda: sc.sce_score_batches(batches(T, I, batch_rows), **kw), repeat)),
                 (f"fit_batches ({batch_rows} rows)",
                  timed(lambda: sc.SchurCorrector(**kw).fit_batches(batches(T, I, batch_rows)), repeat))]
    m = min(n, ref_subsample)
    t_ref = timed(lambda: reference_style(phi_t[:m], phi_i[:m]))
    # Scale only the loop part linearly; the pinv/eigh part does not depend on n.
    if m < n:
        t_tail = timed(lambda: reference_style(phi_t[:2], phi_i[:2]))
        t_ref = t_tail + (t_ref - t_tail) * n / m
    print(f"\n{kernel}: n={n}, d={d}, D={D}, features {phi_t.dtype}, best of {repeat}"
          + (f" (reference timed on {m} pairs, scaled to n)" if m < n else ""))
    print(f"  floor: 3 products + eigh        {t_floor:8.3f} s")
    print(f"  image-only product + eigh       {t_floor_img:8.3f} s")
    print(f"  reference style (loop+pinv)     {t_ref:8.3f} s")
    for name, t in rows:
        print(f"  {name:<32}{t:8.3f} s  {t_ref / t:7.1f}x faster than reference  {t / t_floor:5.2f}x the floor"
              f"  ({t / t_floor_img:4.2f}x image-only)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rff-dim", type=int, default=2500)
    ap.add_argument("--ref-subsample", type=int, default=300, help="pairs the gaussian reference loop is timed on")
    ap.add_argument("--kernels", default="cosine,gaussian")
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (threadpoolctl)")
    ap.add_argument("--batch-rows", type=int, default=2000, help="rows per batch of the streaming forms")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (steadier on a busy machine)")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    print(f"clock: {args.clock}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # then OPENBLAS_NUM_THREADS (or the library's default) decides
        print("threadpoolctl is not installed: BLAS threads as the environment sets them")
        limits = None
    else:
        limits = threadpool_limits(limits=args.threads, user_api="blas")
        print(f"BLAS threads: {args.threads} (threadpoolctl)")
    try:
        for kernel in args.kernels.split(","):
            bench(kernel, args.n, args.dim, args.rff_dim, args.n if kernel == "cosine" else args.ref_subsample,
                  args.repeat, args.batch_rows)
    finally:
        if limits is not None:
            limits.restore_original_limits()


if __name__ == "__main__":
    main()
