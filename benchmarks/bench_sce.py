"""Speed of sce_score and SchurCorrector.fit against two baselines timed in the same process.

(a) reference style: per-sample outer products summed in a Python loop, then pinv (the
    seed's way). For the Gaussian kernel it is timed on a subsample and scaled linearly in n,
    since its loop is linear in n and the full run would take most of an hour.
(b) the floor: one Phi'Phi product of the joint features Phi = [Phi_T, Phi_I] (every score
    needs all three covariance blocks, so no method can do with less) plus one
    eigendecomposition of a D x D matrix. The ratio against the image-only product
    Phi_I'Phi_I plus one eigendecomposition is printed too.

Run: .venv/bin/python benchmarks/bench_sce.py [--n 10000] [--dim 512] [--rff-dim 2500]
Goal (issue 3): >= 50x faster than (a) and within 2x of (b).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import sce_correct as sc


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
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
    joint = np.hstack([phi_t, phi_i])
    G = joint.T @ joint / len(joint)
    return np.linalg.eigh(G[phi_t.shape[1]:, phi_t.shape[1]:])


def floor_image_only(phi_i):
    C = phi_i.T @ phi_i / len(phi_i)
    return np.linalg.eigh(C)


def bench(kernel, n, d, rff_dim, ref_subsample):
    rng = np.random.default_rng(0)
    T = rng.normal(size=(n, d)).astype(np.float32)
    I = (0.7 * T @ (rng.normal(size=(d, d)) / np.sqrt(d)) + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    kw = dict(kernel=kernel, rff_dim=rff_dim, sigma=None if kernel == "cosine" else float(np.sqrt(2 * d)))
    fmap = sc.CosineFeatures() if kernel == "cosine" else sc.RandomFourierFeatures(
        sigma=kw["sigma"], n_components=rff_dim)
    fmap.fit(np.vstack([T, I]))
    phi_t, phi_i = fmap.transform(T), fmap.transform(I)
    D = phi_t.shape[1]

    t_score = timed(lambda: sc.sce_score(T, I, **kw))
    t_fit = timed(lambda: sc.SchurCorrector(**kw).fit(T, I))
    t_floor = timed(lambda: floor(phi_t, phi_i))
    t_floor_img = timed(lambda: floor_image_only(phi_i))
    m = min(n, ref_subsample)
    t_ref = timed(lambda: reference_style(phi_t[:m], phi_i[:m]))
    # Scale only the loop part linearly; the pinv/eigh part does not depend on n.
    if m < n:
        t_tail = timed(lambda: reference_style(phi_t[:2], phi_i[:2]))
        t_ref = t_tail + (t_ref - t_tail) * n / m
    print(f"\n{kernel}: n={n}, d={d}, D={D}" + (f" (reference timed on {m} pairs, scaled to n)" if m < n else ""))
    print(f"  floor (joint Phi'Phi + eigh){t_floor:7.2f} s")
    print(f"  image-only Phi_I'Phi_I + eigh{t_floor_img:6.2f} s")
    print(f"  reference style (loop+pinv){t_ref:8.2f} s")
    for name, t in (("sce_score", t_score), ("SchurCorrector.fit", t_fit)):
        print(f"  {name:<27}{t:8.2f} s   {t_ref / t:7.1f}x faster than reference   {t / t_floor:5.2f}x the floor"
              f"   ({t / t_floor_img:4.2f}x image-only)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rff-dim", type=int, default=2500)
    ap.add_argument("--ref-subsample", type=int, default=300, help="pairs the gaussian reference loop is timed on")
    ap.add_argument("--kernels", default="cosine,gaussian")
    args = ap.parse_args()
    for kernel in args.kernels.split(","):
        bench(kernel, args.n, args.dim, args.rff_dim, args.n if kernel == "cosine" else args.ref_subsample)


if __name__ == "__main__":
    main()
