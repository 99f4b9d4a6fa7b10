"""Evaluation metrics, cross-checked against independent implementations on seeded inputs.

clean-fid (Fréchet distance, KID) and vendi-score are dev dependencies of the project; the
KID, CMMD, CLIPScore, directional-similarity and IS references are written out here as
explicit loops over pairs, so they share no code path with `retrieval.metrics`.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.linalg

from retrieval import metrics
from retrieval.metrics import (
    clip_score, cmmd, directional_similarity, frechet_distance, frechet_distance_from_features,
    inception_score_from_probs, kernel_inception_distance, psnr, rke_from_features, ssim,
    vendi_score_from_features,
)
from sce_correct.errors import InputError


def gaussian_sets(seed: int, n_a: int, n_b: int, d: int, shift: float = 0.3):
    """Two seeded feature sets with different means and covariances."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, d))
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    b = rng.normal(size=(n_b, d)) @ mix + shift
    return a, b


def gaussian_fit(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


# ------------------------------------------------------------------------------ Fréchet distance


# clean-fid calls scipy.linalg.sqrtm(disp=...), deprecated in SciPy 1.17 (removed in 1.18).
clean_fid_warning = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
# vendi-score touches the deprecated scipy.sparse.csr namespace.
vendi_warning = pytest.mark.filterwarnings("ignore:Please import `csr_matrix`")


@clean_fid_warning
def test_frechet_distance_matches_clean_fid():
    from cleanfid.fid import frechet_distance as clean_fid_frechet

    a, b = gaussian_sets(0, 300, 250, 16)
    (mu_a, sig_a), (mu_b, sig_b) = gaussian_fit(a), gaussian_fit(b)
    expected = clean_fid_frechet(mu_a, sig_a, mu_b, sig_b)
    assert expected > 1.0  # the sets differ, so a broken zero would not pass
    assert frechet_distance(mu_a, sig_a, mu_b, sig_b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-9)


@clean_fid_warning
def test_frechet_distance_singular_covariances_match_clean_fid_and_eigen_form(caplog):
    from cleanfid.fid import frechet_distance as clean_fid_frechet

    a, b = gaussian_sets(1, 10, 14, 32)  # n < d: both covariances have rank < d
    (mu_a, sig_a), (mu_b, sig_b) = gaussian_fit(a), gaussian_fit(b)
    assert np.linalg.matrix_rank(sig_a) < 32
    with caplog.at_level(logging.WARNING, logger="retrieval.metrics"):
        ours = frechet_distance_from_features(a, b)
    assert "singular" in caplog.text
    assert ours == pytest.approx(clean_fid_frechet(mu_a, sig_a, mu_b, sig_b), rel=1e-6)

    # tr (S_a S_b)^1/2 = sum of sqrt(eig(S_a^1/2 S_b S_a^1/2)), a symmetric PSD form.
    w, v = np.linalg.eigh(sig_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sig_b @ root_a), 0, None)).sum()
    diff = mu_a - mu_b
    eigen_form = diff @ diff + np.trace(sig_a) + np.trace(sig_b) - 2 * tr_covmean
    assert ours == pytest.approx(eigen_form, rel=1e-5)


def test_frechet_distance_adds_eps_offset_when_square_root_is_not_finite(monkeypatch, caplog):
    a, b = gaussian_sets(2, 40, 40, 6)
    (mu_a, sig_a), (mu_b, sig_b) = gaussian_fit(a), gaussian_fit(b)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def sqrtm_failing_once(matrix, *args, **kwargs):
        calls.append(matrix)
        if len(calls) == 1:
            return np.full_like(matrix, np.nan)
        return real_sqrtm(matrix, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_failing_once)
    eps = 1e-3
    with caplog.at_level(logging.WARNING, logger="retrieval.metrics"):
        got = frechet_distance(mu_a, sig_a, mu_b, sig_b, eps=eps)
    monkeypatch.undo()

    assert len(calls) == 2 and "singular" in caplog.text
    offset = eps * np.eye(6)
    np.testing.assert_allclose(calls[1], (sig_a + offset) @ (sig_b + offset))
    diff = mu_a - mu_b
    expected = (diff @ diff + np.trace(sig_a) + np.trace(sig_b)
                - 2 * np.trace(real_sqrtm((sig_a + offset) @ (sig_b + offset)).real))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rejects_large_imaginary_square_root(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: np.eye(len(m)) * (1 + 0.5j))
    with pytest.raises(InputError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a, _ = gaussian_sets(3, 200, 2, 8)
    assert abs(frechet_distance_from_features(a, a)) < 1e-8


# ------------------------------------------------------------------------------------------- KID


def brute_force_kid(a, b, degree=3, gamma=None, coef0=1.0):
    """Unbiased polynomial-kernel MMD^2 of two equal-size sets, pair by pair."""
    m, d = a.shape
    gamma = 1.0 / d if gamma is None else gamma

    def k(x, y):
        return (gamma * sum(x[t] * y[t] for t in range(d)) + coef0) ** degree

    within_a = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j)
    within_b = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(m))
    return within_a / (m * (m - 1)) + within_b / (m * (m - 1)) - 2 * across / (m * m)


def test_kid_matches_brute_force_on_full_size_subset():
    a, b = gaussian_sets(4, 12, 12, 5)
    # A subset of the full size is a permutation of each set; MMD does not depend on order.
    result = kernel_inception_distance(a, b, n_subsets=1, subset_size=12)
    assert result.subset_size == 12
    assert result.mean == pytest.approx(brute_force_kid(a, b), rel=1e-10)


def test_kid_matches_brute_force_with_other_kernel_parameters():
    a, b = gaussian_sets(5, 10, 10, 4)
    result = kernel_inception_distance(a, b, n_subsets=1, subset_size=10,
                                       degree=2, gamma=0.7, coef0=0.5)
    assert result.mean == pytest.approx(brute_force_kid(a, b, degree=2, gamma=0.7, coef0=0.5),
                                        rel=1e-10)


def test_kid_full_size_subsets_all_agree_and_match_clean_fid():
    from cleanfid.fid import kernel_distance

    a, b = gaussian_sets(6, 60, 60, 20)
    result = kernel_inception_distance(a, b, n_subsets=5, subset_size=1000)
    assert result.subset_size == 60  # capped at the smaller set
    assert result.std == pytest.approx(0.0, abs=1e-12)
    assert result.mean == pytest.approx(kernel_distance(a, b, num_subsets=1), rel=1e-9)
    assert result.mean > 0


def test_kid_random_subsets_match_brute_force_per_subset():
    """Mean and std (ddof=0) over subsets drawn as documented: default_rng(seed), a then b."""
    a, b = gaussian_sets(16, 14, 11, 3)
    rng = np.random.default_rng(5)
    per_subset = []
    for _ in range(4):
        x = a[rng.choice(14, size=6, replace=False)]
        y = b[rng.choice(11, size=6, replace=False)]
        per_subset.append(brute_force_kid(x, y))
    result = kernel_inception_distance(a, b, n_subsets=4, subset_size=6, seed=5)
    assert result.mean == pytest.approx(np.mean(per_subset), rel=1e-10)
    assert result.std == pytest.approx(np.std(per_subset), rel=1e-8)


def test_kid_subsets_are_seeded():
    a, b = gaussian_sets(7, 80, 50, 6)
    first = kernel_inception_distance(a, b, n_subsets=10, subset_size=20, seed=3)
    again = kernel_inception_distance(a, b, n_subsets=10, subset_size=20, seed=3)
    other = kernel_inception_distance(a, b, n_subsets=10, subset_size=20, seed=4)
    assert first == again
    assert first.mean != other.mean
    assert first.std > 0
    assert set(first.to_dict()) == {"mean", "std", "n_subsets", "subset_size"}


# ------------------------------------------------------------------------------------------ CMMD


def brute_force_cmmd(a, b, sigma=10.0, scale=1000.0, unbiased=True):
    def unit(v):
        return v / math.sqrt(sum(t * t for t in v))

    a = [unit(v) for v in a]
    b = [unit(v) for v in b]

    def k(x, y):
        return math.exp(-sum((s - t) ** 2 for s, t in zip(x, y)) / (2 * sigma**2))

    def within(s):
        n = len(s)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j or not unbiased]
        return sum(k(s[i], s[j]) for i, j in pairs) / len(pairs)

    across = sum(k(x, y) for x in a for y in b) / (len(a) * len(b))
    return scale * (within(a) + within(b) - 2 * across)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cmmd_matches_brute_force(unbiased, monkeypatch):
    a, b = gaussian_sets(8, 9, 13, 6, shift=1.0)
    expected = brute_force_cmmd(a, b, unbiased=unbiased)
    assert cmmd(a, b, unbiased=unbiased) == pytest.approx(expected, rel=1e-7)
    # Several row blocks must give the same sums as one block.
    monkeypatch.setattr(metrics, "_KERNEL_BLOCK_ROWS", 4)
    assert cmmd(a, b, unbiased=unbiased) == pytest.approx(expected, rel=1e-7)


def test_cmmd_other_sigma_and_scale_and_unit_normalisation():
    a, b = gaussian_sets(9, 8, 7, 5, shift=0.5)
    expected = brute_force_cmmd(a, b, sigma=0.8, scale=3.0)
    assert cmmd(a, b, sigma=0.8, scale=3.0) == pytest.approx(expected, rel=1e-7)
    # Embeddings are unit-normalised, so rescaling rows changes nothing.
    scaled = a * np.linspace(0.5, 4.0, len(a))[:, None]
    assert cmmd(scaled, b, sigma=0.8, scale=3.0) == pytest.approx(expected, rel=1e-7)


# ---------------------------------------------------------------------------------- Vendi and RKE


@vendi_warning
@pytest.mark.parametrize("n,d", [(15, 40), (60, 8)])  # Gram (n <= d) and covariance (n > d) forms
def test_vendi_and_rke_match_vendi_score_package(n, d):
    from vendi_score import vendi

    x = np.random.default_rng(n).normal(size=(n, d)) + 0.5
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    gram = unit @ unit.T
    assert vendi_score_from_features(x) == pytest.approx(vendi.score_K(gram), rel=1e-8)
    assert vendi_score_from_features(x) == pytest.approx(vendi.score_dual(x), rel=1e-8)
    assert rke_from_features(x) == pytest.approx(vendi.score_K(gram, q=2), rel=1e-8)


def test_vendi_and_rke_count_identical_and_orthogonal_rows():
    assert vendi_score_from_features(np.tile([[1.0, 2.0, 3.0]], (5, 1))) == pytest.approx(1.0)
    orthogonal = np.eye(6)[:4] * np.arange(1, 5)[:, None]
    assert vendi_score_from_features(orthogonal) == pytest.approx(4.0)
    assert rke_from_features(orthogonal) == pytest.approx(4.0)


# ------------------------------------------------------------------ CLIPScore and directional


def test_clip_score_matches_per_pair_formula():
    rng = np.random.default_rng(10)
    image, text = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    text[0] = -image[0]  # a negative cosine, clipped to 0
    result = clip_score(image, text, w=2.5)
    expected = []
    for x, t in zip(image, text):
        norms = math.sqrt(sum(p * p for p in x) * sum(q * q for q in t))
        cos = sum(p * q for p, q in zip(x, t)) / norms
        expected.append(2.5 * max(cos, 0.0))
    np.testing.assert_allclose(result.per_pair, expected, rtol=1e-12)
    assert result.per_pair[0] == 0.0
    assert result.mean == pytest.approx(sum(expected) / 7)
    assert clip_score(image, text, w=1.0).mean == pytest.approx(result.mean / 2.5)
    assert result.to_dict()["per_pair"] == pytest.approx(expected)


def test_directional_similarity_matches_per_pair_formula():
    rng = np.random.default_rng(11)
    src_i, edit_i, src_t, edit_t = (rng.normal(size=(6, 4)) for _ in range(4))

    def unit(v):
        return v / math.sqrt(sum(t * t for t in v))

    expected = []
    for row in range(6):
        di = unit(edit_i[row]) - unit(src_i[row])
        dt = unit(edit_t[row]) - unit(src_t[row])
        expected.append(sum(p * q for p, q in zip(di, dt))
                        / math.sqrt(sum(p * p for p in di) * sum(q * q for q in dt)))
    result = directional_similarity(src_i, edit_i, src_t, edit_t)
    np.testing.assert_allclose(result.per_pair, expected, rtol=1e-10)
    assert result.mean == pytest.approx(np.mean(expected))


def test_directional_similarity_unchanged_image_scores_zero(caplog):
    rng = np.random.default_rng(12)
    src_i, edit_i, src_t, edit_t = (rng.normal(size=(3, 4)) for _ in range(4))
    edit_i[1] = 2.0 * src_i[1]  # same direction: no change on the sphere
    with caplog.at_level(logging.WARNING, logger="retrieval.metrics"):
        result = directional_similarity(src_i, edit_i, src_t, edit_t)
    assert result.per_pair[1] == 0.0 and result.per_pair[0] != 0.0
    assert "1 of 3 pairs" in caplog.text


# ------------------------------------------------------------------------------ Inception Score


def test_inception_score_uniform_rows_give_one():
    result = inception_score_from_probs(np.full((40, 8), 1 / 8), n_splits=4, classifier="test-net")
    assert result.mean == pytest.approx(1.0)
    assert result.std == pytest.approx(0.0, abs=1e-12)
    assert result.to_dict()["classifier"] == "test-net"


def test_inception_score_confident_even_classes_give_class_count():
    k = 7
    probs = np.tile(np.eye(k), (2 * 5, 1))  # each of the 5 splits holds every class twice
    result = inception_score_from_probs(probs, n_splits=5)
    assert result.mean == pytest.approx(float(k))
    assert result.std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_matches_explicit_formula():
    probs = np.random.default_rng(13).dirichlet(np.full(6, 0.3), size=23)
    n_splits = 3
    scores = []
    for s in range(n_splits):
        part = probs[s * 23 // n_splits:(s + 1) * 23 // n_splits]
        marginal = [sum(row[c] for row in part) / len(part) for c in range(6)]
        kl = [sum(row[c] * math.log(row[c] / marginal[c]) for c in range(6) if row[c] > 0)
              for row in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    result = inception_score_from_probs(probs, n_splits=n_splits)
    assert result.mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert result.std == pytest.approx(np.std(scores), rel=1e-8)


# ------------------------------------------------------------------------------------ PSNR, SSIM


def noisy_pair(seed=14, sigma=12.0, shape=(32, 24, 3)):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, size=shape, dtype=np.uint8)
    noisy = np.clip(clean + rng.normal(0, sigma, size=shape), 0, 255).astype(np.uint8)
    return clean, noisy


def test_identical_images_give_inf_psnr_and_unit_ssim():
    img, _ = noisy_pair()
    assert psnr(img, img.copy()) == math.inf
    assert ssim(img, img.copy()) == pytest.approx(1.0)


def test_psnr_matches_textbook_formula():
    clean, noisy = noisy_pair()
    mse = np.mean((clean.astype(np.float64) - noisy.astype(np.float64)) ** 2)
    assert psnr(clean, noisy) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    # No uint8 wrap-around: a difference of 200 must count as 200, not 56.
    dark, bright = np.zeros((12, 12, 3), np.uint8), np.full((12, 12, 3), 200, np.uint8)
    assert psnr(dark, bright) == pytest.approx(10 * math.log10(255**2 / 200**2))


def wang_ssim(x, y, data_range=255.0):
    """Textbook SSIM (Wang et al., 2004): 11 x 11 Gaussian window, sigma 1.5, population
    statistics, mean over the pixels whose window lies inside the image."""
    from scipy.ndimage import gaussian_filter

    def blur(z):
        return gaussian_filter(z, sigma=1.5, truncate=3.5)  # radius 5: an 11 x 11 window

    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
                / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return ssim_map[5:-5, 5:-5].mean()


def test_ssim_matches_textbook_wang_formula():
    clean, noisy = noisy_pair(sigma=20.0)
    per_channel = [wang_ssim(clean[..., c], noisy[..., c]) for c in range(3)]
    assert ssim(clean, noisy) == pytest.approx(np.mean(per_channel), rel=1e-6)
    assert ssim(clean[..., 0], noisy[..., 0]) == pytest.approx(per_channel[0], rel=1e-6)


def test_ssim_falls_with_noise_and_is_symmetric():
    clean, light = noisy_pair(sigma=5.0)
    _, heavy = noisy_pair(sigma=40.0)
    light_score, heavy_score = ssim(clean, light), ssim(clean, heavy)
    assert 0.0 < heavy_score < light_score < 1.0
    assert ssim(light, clean) == pytest.approx(light_score)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, message", [
    (lambda: clip_score(np.ones((3, 4)), np.ones((2, 4))), "pair up row by row"),
    (lambda: clip_score(np.ones((3, 4)), np.ones((3, 5))), "mixed encoders"),
    (lambda: clip_score(np.ones(4), np.ones(4)), "2-D"),
    (lambda: clip_score(np.zeros((2, 4)), np.ones((2, 4))), "all-zero row"),
    (lambda: frechet_distance_from_features(np.ones((1, 3)), np.ones((5, 3))),
     "at least 2 rows to estimate a covariance"),
    (lambda: frechet_distance_from_features(np.ones((5, 3)), np.ones((5, 4))), "mixed encoders"),
    (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "mixed encoders"),
    (lambda: frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), "sigma1"),
    (lambda: kernel_inception_distance(np.ones((1, 3)), np.ones((5, 3))), "at least 2 rows"),
    (lambda: kernel_inception_distance(np.ones((4, 3)), np.ones((4, 3)), n_subsets=0),
     "n_subsets"),
    (lambda: cmmd(np.ones((4, 3)), np.ones((4, 2))), "mixed encoders"),
    (lambda: directional_similarity(*(np.ones((3, 4)),) * 3, np.ones((2, 4))), "edit_txt"),
    (lambda: vendi_score_from_features(np.ones((0, 4))), "at least 1 rows"),
    (lambda: inception_score_from_probs(np.full((5, 4), 0.25), n_splits=10), "fewer than n_splits"),
    (lambda: inception_score_from_probs(np.full((20, 4), 0.5), n_splits=2), "sum to 1"),
    (lambda: inception_score_from_probs(-np.full((20, 4), 0.25), n_splits=2), "logits"),
    (lambda: psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)), "same shape"),
    (lambda: ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)), "11 x 11"),
    (lambda: clip_score([["a", "b"]], np.ones((1, 2))), "numeric"),
    (lambda: kernel_inception_distance(np.ones((4, 3)), np.ones((4, 3)), coef0=float("inf")), "coef0"),
    (lambda: kernel_inception_distance(np.ones((4, 3)), np.ones((4, 3)), gamma=-1.0), "gamma"),
    (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), eps=0.0), "eps"),
    (lambda: frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3)), "NaN"),
    (lambda: psnr(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2))), "H x W"),
])
def test_bad_input_raises_a_named_input_error(call, message):  # an InputError is a ValueError
    with pytest.raises(InputError, match=message):
        call()


def test_nan_is_reported_with_the_argument_name():
    a, b = gaussian_sets(15, 20, 20, 3)
    a[4, 1] = np.nan
    for fn in (frechet_distance_from_features, kernel_inception_distance, cmmd):
        message = r"feats_a contains NaN or inf in 1 row\(s\), first at row 4"
        with pytest.raises(InputError, match=message):
            fn(a, b)
