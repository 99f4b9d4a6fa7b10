"""sce_correct against an independent brute-force computation written from DESIGN.md section 2."""
from __future__ import annotations

import numpy as np
import pytest

import sce_correct as sc

RIDGE = 1e-3


# ---------------------------------------------------------------- brute force, from the formulas
def bf_cos(X):
    return np.array([x / np.sqrt(np.dot(x, x)) for x in X])


def bf_rff(X, W):
    m = W.shape[1]
    return np.array([np.concatenate([np.cos(W.T @ x), np.sin(W.T @ x)]) / np.sqrt(m) for x in X])


def bf_cov(A, B):
    """Sum of per-sample outer products, divided by n (the seed's slow way, on purpose)."""
    C = np.zeros((A.shape[1], B.shape[1]))
    for a, b in zip(A, B):
        C += np.outer(a, b)
    return C / A.shape[0]


def bf_blocks(phi_t, phi_i, eps):
    C_T, C_I, C_TI = bf_cov(phi_t, phi_t), bf_cov(phi_i, phi_i), bf_cov(phi_t, phi_i)
    gamma = np.linalg.inv(C_T + eps * np.eye(C_T.shape[0])) @ C_TI
    R = C_TI.T @ gamma
    return C_T, C_I, C_TI, gamma, R, C_I - R


def bf_entropy(M):
    lam = np.clip(np.linalg.eigvalsh(M), 0, None)
    lam = lam[lam > 1e-300]
    return float(np.exp(-np.sum(lam * np.log(lam / lam.sum()))))


def bf_vendi_rke(C):
    lam = np.clip(np.linalg.eigvalsh(C), 0, None)
    p = lam / lam.sum()
    nz = p[p > 0]
    return float(np.exp(-np.sum(nz * np.log(nz)))), float(1 / np.sum(p**2))


def paired_data(n=120, d=12, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, d))
    I = 0.8 * T @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.6 * rng.normal(size=(n, d)) + 0.3
    return T, I


# ---------------------------------------------------------------- covariances, Gamma, R, S
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_gamma_matches_brute_force(method):
    T, I = paired_data()
    c = sc.SchurCorrector(ridge=RIDGE, method=method).fit(T, I)
    *_, gamma, R, _ = bf_blocks(bf_cos(T), bf_cos(I), RIDGE)
    np.testing.assert_allclose(c.gamma_, gamma, rtol=1e-7, atol=1e-9)
    lam = np.sort(np.linalg.eigvalsh(R))[::-1]
    np.testing.assert_allclose(c.explained_eigvals_, np.clip(lam, 0, None), atol=1e-10)


def test_gamma_gaussian_uses_shared_random_features():
    T, I = paired_data(n=80, d=6)
    c = sc.SchurCorrector(kernel="gaussian", rff_dim=40, sigma=2.0, ridge=RIDGE).fit(T, I)
    W = c.feature_map_.frequencies_
    assert W.shape == (6, 40)
    *_, gamma, _, _ = bf_blocks(bf_rff(T, W), bf_rff(I, W), RIDGE)
    np.testing.assert_allclose(c.gamma_, gamma, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kernel", ["cosine", "gaussian"])
def test_r_plus_s_is_c_i_and_s_is_psd(kernel):
    T, I = paired_data(n=90, d=8, seed=3)
    spectra = sc.schur_spectra(T, I, kernel=kernel, rff_dim=30, ridge=RIDGE, method="primal")
    fmap = sc.CosineFeatures() if kernel == "cosine" else sc.RandomFourierFeatures(
        sigma=spectra.sigma, n_components=30, seed=0)
    fmap.fit(np.vstack([T, I]))
    _, C_I, _, _, R, S = bf_blocks(fmap.transform(T), fmap.transform(I), RIDGE)
    np.testing.assert_allclose(R + S, C_I, atol=1e-12)
    assert np.linalg.eigvalsh(S).min() > -1e-10
    assert abs(np.trace(C_I) - 1) < 1e-12
    np.testing.assert_allclose(spectra.schur[: S.shape[0]], np.clip(np.sort(np.linalg.eigvalsh(S))[::-1], 0, None), atol=1e-10)
    np.testing.assert_allclose(spectra.explained.sum() + spectra.schur.sum(), 1.0, atol=1e-10)


# ---------------------------------------------------------------- scores
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_scores_match_brute_force(method):
    T, I = paired_data(n=60, d=10, seed=1)
    rep = sc.sce_score(T, I, ridge=RIDGE, method=method)
    _, C_I, _, _, R, S = bf_blocks(bf_cos(T), bf_cos(I), RIDGE)
    vendi, rke = bf_vendi_rke(C_I)
    assert rep.image_diversity == pytest.approx(bf_entropy(S), rel=1e-8)
    assert rep.text_diversity == pytest.approx(bf_entropy(R), rel=1e-8)
    assert rep.image_share == pytest.approx(np.trace(S), abs=1e-10)
    assert rep.text_share == pytest.approx(np.trace(R), abs=1e-10)
    assert rep.vendi == pytest.approx(vendi, rel=1e-8)
    assert rep.rke == pytest.approx(rke, rel=1e-8)
    assert rep.n == 60 and rep.method == method


def test_entropy_score_formula_on_known_spectrum():
    # Eigenvalues (0.3, 0.1): E = exp(-(0.3 log 0.75 + 0.1 log 0.25)); a tiny negative is clipped.
    expected = np.exp(-(0.3 * np.log(0.75) + 0.1 * np.log(0.25)))
    assert sc.matrix_entropy_score([0.3, 0.1, -1e-15]) == pytest.approx(expected)
    assert sc.vendi_score([0.25] * 4) == pytest.approx(4.0)
    assert sc.rke_score([0.5, 0.5]) == pytest.approx(2.0)


def test_text_explaining_everything_leaves_no_image_diversity():
    rng = np.random.default_rng(5)
    T = rng.normal(size=(50, 6))
    rep = sc.sce_score(T, T.copy(), ridge=1e-8)
    assert rep.text_share == pytest.approx(1.0, abs=1e-5)
    assert rep.image_share < 1e-5
    assert rep.image_diversity == pytest.approx(1.0, abs=1e-3)


def test_unrelated_text_explains_little():
    rng = np.random.default_rng(6)
    T, I = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    rep = sc.sce_score(T, I, ridge=RIDGE)
    assert rep.text_share < 0.02 and rep.image_share > 0.98


# ---------------------------------------------------------------- primal == dual
@pytest.mark.parametrize("kernel,n", [("cosine", 40), ("cosine", 200), ("gaussian", 30), ("gaussian", 150)])
def test_primal_equals_dual(kernel, n):
    T, I = paired_data(n=n, d=16, seed=2)
    kw = dict(kernel=kernel, rff_dim=50, ridge=RIDGE)
    a = sc.sce_score(T, I, method="primal", **kw)
    b = sc.sce_score(T, I, method="dual", **kw)
    for field in ("image_diversity", "text_diversity", "image_share", "text_share", "vendi", "rke"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-7), field
    ga = sc.SchurCorrector(ridge=RIDGE, method="primal", kernel=kernel, rff_dim=50).fit(T, I).gamma_
    gb = sc.SchurCorrector(ridge=RIDGE, method="dual", kernel=kernel, rff_dim=50).fit(T, I).gamma_
    np.testing.assert_allclose(ga, gb, atol=1e-7)


def test_auto_method_picks_the_smaller_side():
    T, I = paired_data(n=30, d=16)
    assert sc.sce_score(T, I).method == "primal"  # n=30 >= D=16
    T, I = paired_data(n=10, d=16)
    assert sc.sce_score(T, I).method == "dual"


def test_modes_primal_equals_dual_and_match_eigenvectors():
    T, I = paired_data(n=80, d=10, seed=4)
    for fn, args in ((sc.schur_modes, (T, I)), (sc.kernel_modes, (I,))):
        kw = dict(n_modes=3, top=5) | ({"ridge": RIDGE} if fn is sc.schur_modes else {})
        p = fn(*args, method="primal", **kw)
        d = fn(*args, method="dual", **kw)
        for mp, md in zip(p, d):
            assert mp.eigenvalue == pytest.approx(md.eigenvalue, rel=1e-7)
            np.testing.assert_allclose(mp.scores, md.scores, atol=1e-7)
            assert list(mp.top_indices) == list(md.top_indices)
    # Brute force: top eigenvector of S, scores phi(x).v, sign fixed the same way.
    _, C_I, _, _, _, S = bf_blocks(bf_cos(T), bf_cos(I), RIDGE)
    lam, V = np.linalg.eigh(S)
    v = V[:, -1]
    s = bf_cos(I) @ v
    s = s if s[np.argmax(np.abs(s))] > 0 else -s
    mode0 = sc.schur_modes(T, I, n_modes=1, top=5, ridge=RIDGE)[0]
    assert mode0.eigenvalue == pytest.approx(lam[-1], rel=1e-8)
    np.testing.assert_allclose(mode0.scores, s, atol=1e-9)
    assert list(mode0.top_indices) == list(np.argsort(-s)[:5])


def test_gaussian_exact_dual_matches_exact_kernel_brute_force():
    T, I = paired_data(n=40, d=5, seed=7)
    sigma = 2.5
    rep = sc.sce_score(T, I, kernel="gaussian-exact", sigma=sigma, ridge=RIDGE)
    K = lambda A: np.exp(-((A[:, None, :] - A[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))
    K_T, K_I = K(T), K(I)
    n = len(T)
    H = K_T @ np.linalg.inv(K_T + n * RIDGE * np.eye(n))
    # Eigenvalues of Phi'(I-H)Phi/n = those of (I-H) K_I / n (similar matrices).
    lam_s = np.linalg.eigvals((np.eye(n) - H) @ K_I / n).real
    lam_r = np.linalg.eigvals(H @ K_I / n).real
    assert rep.image_share == pytest.approx(lam_s.sum(), rel=1e-8)
    assert rep.text_share == pytest.approx(lam_r.sum(), rel=1e-8)
    assert rep.image_diversity == pytest.approx(sc.matrix_entropy_score(lam_s), rel=1e-6)


# ---------------------------------------------------------------- random Fourier features
def test_rff_rows_are_unit_norm_and_approximate_the_gaussian_kernel():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(100, 6))
    sigma = 3.0
    phi = sc.RandomFourierFeatures(sigma=sigma, n_components=8000, seed=1).fit_transform(X)
    np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-12)
    exact = sc.gaussian_kernel(X, X, sigma)
    err = np.abs(phi @ phi.T - exact)
    # Each entry is a mean of 8000 bounded terms: standard error <= 1/sqrt(2*8000) ~ 0.008.
    assert err.max() < 0.05 and err.mean() < 0.01


def test_rff_scores_approach_the_exact_kernel():
    T, I = paired_data(n=150, d=6, seed=9)
    exact = sc.sce_score(T, I, kernel="gaussian-exact", sigma=3.0, ridge=1e-2)
    approx = sc.sce_score(T, I, kernel="gaussian", sigma=3.0, rff_dim=6000, ridge=1e-2)
    assert approx.image_share == pytest.approx(exact.image_share, rel=0.05)
    assert approx.image_diversity == pytest.approx(exact.image_diversity, rel=0.1)


def test_median_heuristic_sigma():
    X = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3 -> median 2
    assert sc.RandomFourierFeatures(n_components=4).fit(X).sigma_ == pytest.approx(2.0)


def test_same_seed_same_result_other_seed_differs():
    T, I = paired_data(n=50, d=6)
    a = sc.sce_score(T, I, kernel="gaussian", rff_dim=100, seed=11)
    b = sc.sce_score(T, I, kernel="gaussian", rff_dim=100, seed=11)
    c = sc.sce_score(T, I, kernel="gaussian", rff_dim=100, seed=12)
    assert a == b
    assert a.image_diversity != c.image_diversity
    ca = sc.SchurCorrector(kernel="gaussian", rff_dim=100, seed=3).fit(T, I)
    cb = sc.SchurCorrector(kernel="gaussian", rff_dim=100, seed=3).fit(T, I)
    np.testing.assert_array_equal(ca.correct(T, I), cb.correct(T, I))


@pytest.mark.parametrize("kernel", ["cosine", "gaussian", "gaussian-exact"])
def test_joint_permutation_of_pairs_changes_nothing(kernel):
    T, I = paired_data(n=70, d=8, seed=10)
    perm = np.random.default_rng(0).permutation(70)
    a = sc.sce_score(T, I, kernel=kernel, rff_dim=60, ridge=RIDGE)
    b = sc.sce_score(T[perm], I[perm], kernel=kernel, rff_dim=60, ridge=RIDGE)
    for field in ("image_diversity", "text_diversity", "image_share", "vendi", "rke"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-8)
    ga = sc.SchurCorrector(ridge=RIDGE).fit(T, I).gamma_
    gb = sc.SchurCorrector(ridge=RIDGE).fit(T[perm], I[perm]).gamma_
    np.testing.assert_allclose(ga, gb, atol=1e-10)
    # Breaking the pairing (permuting one side only) does change the result.
    c = sc.sce_score(T, I[perm], kernel=kernel, rff_dim=60, ridge=RIDGE)
    assert abs(c.text_share - a.text_share) > 1e-3


def test_float32_embeddings_give_the_float64_numbers():
    """float32 input runs the n-sized products in single precision; results agree to ~1e-5."""
    T, I = paired_data(n=3000, d=32, seed=12)
    a = sc.sce_score(T, I, method="primal")
    b = sc.sce_score(T.astype(np.float32), I.astype(np.float32), method="primal")
    for field in ("image_diversity", "text_diversity", "image_share", "vendi", "rke"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-4), field
    ga = sc.SchurCorrector(method="primal").fit(T, I).gamma_
    gb = sc.SchurCorrector(method="primal").fit(T.astype(np.float32), I.astype(np.float32)).gamma_
    assert gb.dtype == np.float64
    np.testing.assert_allclose(gb, ga, atol=1e-3)
