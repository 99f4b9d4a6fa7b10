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


def test_offset_regression_matches_the_closed_form_kernel_ridge():
    rng = np.random.default_rng(3)
    images, anchors, items = rng.normal(size=(12, 5)), rng.normal(size=(6, 5)), rng.normal(size=(9, 5))
    groups = np.repeat(np.arange(4), 3)
    got = ca.offset_regression(images, ca.group_offsets(images, groups), anchors, items, gamma=0.3, alpha=0.1)
    # by hand: targets are each image minus its group's mean, zeros for the anchors; the
    # dual coefficients solve (K + alpha I) c = targets; the prediction is k(item, inputs) c
    means = np.stack([images[groups == g].mean(0) for g in range(4)])
    A = np.concatenate([images, anchors])
    T = np.concatenate([images - means[groups], np.zeros((6, 5))])
    kernel = lambda a, b: np.exp(-0.3 * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # noqa: E731
    coef = np.linalg.solve(kernel(A, A) + 0.1 * np.eye(len(A)), T)
    np.testing.assert_allclose(got, items - kernel(items, A) @ coef, atol=1e-10)


def test_offset_regression_follows_an_object_dependent_concept_that_a_projection_cannot():
    # Two kinds of object, each with its own concept direction: a projection of one direction
    # leaves the other kind's; the kernel regression, fitted on some objects of both kinds,
    # takes the concept out of new objects of both kinds and leaves concept-free items alone.
    rng = np.random.default_rng(4)
    d = 8
    kinds = np.eye(d)[:2] * 4  # kind centres, far apart
    concept = np.eye(d)[[2, 3]]  # kind 0 varies along e2, kind 1 along e3

    def objects(n):
        kind = np.arange(n) % 2
        centres = kinds[kind] + 0.3 * rng.normal(size=(n, d)) * (np.arange(d) >= 4)
        values = np.array([-1.0, 0.0, 1.0])
        rows = (centres[:, None, :] + values[None, :, None] * concept[kind][:, None, :]).reshape(-1, d)
        return rows, np.repeat(np.arange(n), 3), np.repeat(kind, 3), np.tile(values, n)

    fit, fit_groups, _, _ = objects(40)
    new, _, new_kind, new_values = objects(10)
    anchors = kinds[np.arange(30) % 2] + 0.3 * rng.normal(size=(30, d)) * (np.arange(d) >= 4)
    got = ca.offset_regression(fit, ca.group_offsets(fit, fit_groups), anchors, np.concatenate([new, anchors]),
                               gamma=0.1, alpha=1e-3)
    corrected, kept = got[: len(new)], got[len(new):]
    along = np.einsum("ij,ij->i", corrected, concept[new_kind])
    before = np.einsum("ij,ij->i", new, concept[new_kind])
    assert np.corrcoef(before, new_values)[0, 1] > 0.99
    assert np.abs(along).max() < 0.1 * np.abs(before).max()  # the concept is gone from new objects
    np.testing.assert_allclose(kept, anchors, atol=0.05)  # and the anchors stay where they were


def test_partner_offsets_take_each_images_nearest_image_of_every_other_prompt():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(20, 6))
    prompts = np.array(list("abcd") * 5)
    got = ca.partner_offsets(images, prompts)
    u = _unit(images)
    for i in range(20):
        partners = [i]
        for value in "abcd":
            if value != prompts[i]:
                candidates = [j for j in range(20) if prompts[j] == value]
                partners.append(max(candidates, key=lambda j: u[i] @ u[j]))
        np.testing.assert_allclose(got[i], images[i] - images[partners].mean(0), atol=1e-12)
    # when each object's images are far closer to each other than to other objects', the
    # partners are the object's other images and the offsets are the group offsets
    centres = np.repeat(rng.normal(size=(5, 6)) * 10, 4, axis=0)
    objects = centres + 0.1 * rng.normal(size=(20, 6))
    np.testing.assert_allclose(ca.partner_offsets(objects, prompts), ca.group_offsets(objects, np.repeat(np.arange(5), 4)))


def test_weakest_concept_rows_rank_by_the_part_the_projection_removes():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(30, 5))
    P = np.diag([1.0, 1, 1, 0, 0])  # removes the last two coordinates
    candidates = np.arange(3, 30)
    got = ca.weakest_concept_rows(X, P, candidates, 7)
    by_hand = sorted(candidates, key=lambda i: np.hypot(X[i, 3], X[i, 4]))[:7]
    assert got.tolist() == by_hand
