"""TEXTSPAN (sce_correct/textspan.py) against planted data and a brute-force evaluation."""
from __future__ import annotations

import numpy as np
import pytest

import sce_correct
from sce_correct import InputError, SpanText, textspan


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def planted(seed=0, n=4000, d=32, distractors=20, noise=0.01):
    """Outputs made of 3 orthonormal text directions with std 3, 2, 1 (+ a mean and noise);
    a bank of those 3 texts among random unit distractors, shuffled."""
    rng = np.random.default_rng(seed)
    directions, _ = np.linalg.qr(rng.standard_normal((d, 3)))
    directions = directions.T  # 3 x d, orthonormal
    stds = np.array([3.0, 2.0, 1.0])
    scores = rng.standard_normal((n, 3)) * stds
    outputs = scores @ directions + rng.standard_normal(d) + noise * rng.standard_normal((n, d))
    bank = np.vstack([directions, unit(rng.standard_normal((distractors, d)))])
    order = rng.permutation(len(bank))
    bank = bank[order]
    where = [int(np.flatnonzero(order == k)[0]) for k in range(3)]  # bank row of each planted text
    sample_var = (scores - scores.mean(0)).var(axis=0)
    return outputs, bank, where, sample_var


def test_recovers_planted_texts_in_order_of_variance():
    outputs, bank, where, sample_var = planted()
    picks = textspan(outputs, bank, n_components=3, rank=10)
    assert [p.index for p in picks] == where
    np.testing.assert_allclose([p.variance for p in picks], sample_var, rtol=1e-3)
    total = outputs.var(axis=0).sum()
    assert sum(p.variance for p in picks) <= total
    # the three explain all but the noise
    assert sum(p.variance for p in picks) > 0.99 * total
    assert all(isinstance(p, SpanText) and isinstance(p, tuple) for p in picks)


def span_basis(outputs: np.ndarray, rank: int) -> np.ndarray:
    """Top-`rank` right singular vectors of the uncentred outputs, via eigh of C'C (d x rank)."""
    values, vectors = np.linalg.eigh(outputs.T @ outputs)
    return vectors[:, np.argsort(values)[::-1][:rank]]


def brute_force(outputs, bank, path, rank):
    """TEXTSPAN's steps evaluated exhaustively in the full d-dimensional space: at each step,
    for every text not yet picked, deflate the residual outputs explicitly and measure how much
    total variance they lose. Follows `path` (the picks made), so ties cannot fork the paths.
    Returns the per-step {candidate: explained} and the variance left at the end."""
    basis = span_basis(outputs, min(rank, outputs.shape[0]))
    residual = outputs - outputs.mean(axis=0)
    texts = bank @ basis @ basis.T  # projected onto the span, still in d-space
    steps = []
    for step, chosen in enumerate(path):
        before = (residual ** 2).sum() / len(residual)
        explained = {}
        for j in range(len(bank)):
            if j in path[:step]:
                continue
            u = texts[j] / np.linalg.norm(texts[j])
            after = ((residual - np.outer(residual @ u, u)) ** 2).sum() / len(residual)
            explained[j] = before - after
        steps.append(explained)
        u = texts[chosen] / np.linalg.norm(texts[chosen])
        residual = residual - np.outer(residual @ u, u)
        texts = texts - np.outer(texts @ u, u)
    return steps, (residual ** 2).sum() / len(residual)


@pytest.mark.parametrize("seed", range(12))
def test_each_greedy_choice_is_the_exhaustive_best(seed):
    rng = np.random.default_rng(100 + seed)
    n, d, m = int(rng.integers(6, 40)), int(rng.integers(4, 12)), int(rng.integers(4, 10))
    rank = int(rng.integers(2, d + 1))
    k = int(rng.integers(1, min(m, rank, n) + 1))
    # anisotropic outputs with a mean, as a head's outputs are
    outputs = rng.standard_normal((n, d)) @ np.diag(rng.uniform(0.1, 3.0, d)) + rng.standard_normal(d)
    bank = unit(rng.standard_normal((m, d)))
    picks = textspan(outputs, bank, n_components=k, rank=rank)
    assert len(picks) == k and len({p.index for p in picks}) == k
    steps, residual_var = brute_force(outputs, bank, [p.index for p in picks], rank)
    for pick, explained in zip(picks, steps):
        best = max(explained.values())
        assert pick.variance == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert explained[pick.index] == pytest.approx(best, rel=1e-9, abs=1e-12)
        # where the best is unique (no tie, e.g. not the last direction of the span), it is the pick
        runner_up = sorted(explained.values())[-2] if len(explained) > 1 else -np.inf
        if best - runner_up > 1e-6 * best:
            assert pick.index == max(explained, key=explained.get)
    total = outputs.var(axis=0).sum()
    explained_sum = sum(p.variance for p in picks)
    assert explained_sum <= total * (1 + 1e-12)
    # nothing is lost or counted twice: explained + what is left = the total variance
    assert explained_sum + residual_var == pytest.approx(total, rel=1e-9)


def test_text_norms_do_not_matter():
    outputs, bank, _, _ = planted(seed=3, n=500)
    scales = np.random.default_rng(4).uniform(0.1, 10.0, len(bank))[:, None]
    assert ([p.index for p in textspan(outputs, bank * scales, 3, rank=8)]
            == [p.index for p in textspan(outputs, bank, 3, rank=8)])


def test_duplicate_texts_are_not_picked_twice_and_exhaustion_stops_early(caplog):
    rng = np.random.default_rng(5)
    outputs = rng.standard_normal((50, 6))
    text = unit(rng.standard_normal(6))
    bank = np.vstack([text, 2 * text, -text])  # one direction, three times
    picks = textspan(outputs, bank, n_components=3, rank=6)
    assert len(picks) == 1 and "returning 1 of 3" in caplog.text


def test_texts_outside_the_span_are_never_picked():
    rng = np.random.default_rng(6)
    outputs = np.zeros((30, 5))
    outputs[:, :2] = rng.standard_normal((30, 2))  # the head writes into 2 of 5 dimensions
    bank = np.eye(5)[[4, 3, 0, 1]]  # rows 0, 1 are orthogonal to the span
    picks = textspan(outputs, bank, n_components=2, rank=2)
    assert sorted(p.index for p in picks) == [2, 3]


def test_exported_from_the_package():
    assert sce_correct.textspan is textspan and "textspan" in sce_correct.__all__


@pytest.mark.parametrize("outputs,bank,kwargs,message", [
    (np.ones(5), np.ones((3, 5)), {}, "head_outputs must be 2-D"),
    (np.ones((1, 5)), np.ones((3, 5)), dict(n_components=1, rank=1), "at least 2 rows"),
    (np.ones((4, 5)), np.ones((3, 6)), dict(n_components=1, rank=1), "dimension 6 but head_outputs has 5"),
    (np.full((4, 5), np.nan), np.ones((3, 5)), dict(n_components=1, rank=1), "head_outputs contains NaN"),
    (np.ones((4, 5)), np.array([[np.inf] * 5]), dict(n_components=1, rank=1), "text_bank contains NaN"),
    (np.ones((40, 5)), np.ones((3, 5)), dict(n_components=1, rank=6), "rank must be at most the dimension d = 5"),
    (np.ones((40, 5)), np.ones((3, 5)), dict(n_components=4, rank=5), r"n_components \(4\) exceeds the 3 text"),
    (np.ones((40, 5)), np.ones((9, 5)), dict(n_components=4, rank=3), r"exceeds the span's rank \(3"),
    (np.ones((3, 5)), np.ones((9, 5)), dict(n_components=4, rank=5), "capped at the 3 images"),
    (np.ones((4, 5)), np.ones((3, 5)), dict(n_components=0, rank=2), "n_components must be a positive integer"),
    (np.ones((4, 5)), np.ones((3, 5)), dict(n_components=1, rank=2.5), "rank must be a positive integer"),
    (np.ones((4, 5)), np.ones((3, 5)), dict(n_components=True, rank=2), "n_components must be a positive integer"),
    ([["a"]], np.ones((3, 5)), {}, "head_outputs must be a numeric"),
])
def test_bad_inputs_are_input_errors(outputs, bank, kwargs, message):
    with pytest.raises(InputError, match=message):
        textspan(outputs, bank, **kwargs)
