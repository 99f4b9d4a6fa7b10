"""The benchmark's approaches to removing a concept (benchmarks/concept_approaches.py), each
against a brute-force computation on seeded random data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import concept_approaches as ca  # noqa: E402


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_local_projection_removes_each_rows_nearest_groups_top_directions():
    rng = np.random.default_rng(0)
    d, groups = 12, np.repeat(np.array(["a", "b", "c"]), 5)
    centres = rng.normal(size=(3, d)) * 3
    images = centres[np.repeat(np.arange(3), 5)] + rng.normal(size=(15, d))
    Y = centres[rng.integers(0, 3, 40)] + rng.normal(size=(40, d))
    got = ca.local_projection(Y, images, groups, rank=2)
    for y, out in zip(Y, got):
        means = [images[groups == g].mean(0) for g in "abc"]
        g = int(np.argmax([y @ m / np.linalg.norm(y) / np.linalg.norm(m) for m in means]))
        members = images[groups == "abc"[g]] - means[g]
        # the top-2 principal axes by brute force: eigenvectors of the group's scatter
        vals, vecs = np.linalg.eigh(members.T @ members)
        B = vecs[:, ::-1][:, :2]
        np.testing.assert_allclose(out, y - B @ (B.T @ y), atol=1e-10)
        np.testing.assert_allclose(B.T @ out, 0, atol=1e-10)


def test_group_means_replace_masked_rows_by_their_groups_mean():
    rng = np.random.default_rng(1)
    V, groups = rng.normal(size=(10, 4)), np.array(list("aabbbccdde"))
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
    got = ca.group_means(V, groups, mask)
    for i in range(10):
        same = mask & (groups == groups[i])
        np.testing.assert_allclose(got[i], V[same].mean(0) if mask[i] else V[i])


def test_knn_smooth_averages_each_row_with_its_close_neighbours():
    rng = np.random.default_rng(2)
    Y = _unit(rng.normal(size=(30, 6)))
    Y[10:15] = _unit(Y[10] + 0.05 * rng.normal(size=(5, 6)))  # a tight cluster
    got = ca.knn_smooth(Y, tau=0.85, neighbours=3, block=7)
    for i in range(30):
        sims = Y @ Y[i]
        order = [j for j in np.argsort(-sims) if j != i][:3]
        near = [i] + [j for j in order if sims[j] >= 0.85]
        expected = Y[near].mean(0)
        np.testing.assert_allclose(got[i], expected, atol=1e-10)
