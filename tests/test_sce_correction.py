"""Paired correction, projections, persistence, bad input and the planted-concept check."""
from __future__ import annotations

import json

import numpy as np
import pytest

import sce_correct as sc
from test_sce_math import RIDGE, bf_blocks, bf_cos, bf_rff, paired_data


# ---------------------------------------------------------------- paired correction
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_paired_correction_matches_formula(strength):
    T, I = paired_data(n=100, d=10)
    c = sc.SchurCorrector(ridge=RIDGE, strength=strength).fit(T, I)
    *_, gamma, _, _ = bf_blocks(bf_cos(T), bf_cos(I), RIDGE)
    T2, I2 = paired_data(n=7, d=10, seed=42)
    expected = np.array([bf_cos(I2)[i] - strength * gamma.T @ bf_cos(T2)[i] for i in range(7)])
    np.testing.assert_allclose(c.correct(T2, I2), expected, atol=1e-10)


def test_gaussian_paired_correction_lives_in_feature_space():
    T, I = paired_data(n=60, d=5)
    c = sc.SchurCorrector(kernel="gaussian", rff_dim=25, ridge=RIDGE).fit(T, I)
    out = c.correct(T[:4], I[:4])
    W = c.feature_map_.frequencies_
    np.testing.assert_allclose(out, bf_rff(I[:4], W) - bf_rff(T[:4], W) @ c.gamma_, atol=1e-10)
    assert out.shape == (4, 50)


def test_correction_removes_what_text_explains_on_average():
    """Nullified targets are uncorrelated (in the uncentred sense) with the source features."""
    T, I = paired_data(n=400, d=8, seed=3)
    c = sc.SchurCorrector(ridge=1e-8).fit(T, I)
    resid = c.correct(T, I)
    cross = bf_cos(T).T @ resid / len(T)
    assert np.abs(cross).max() < 1e-6
    assert np.abs(bf_cos(T).T @ bf_cos(I) / len(T)).max() > 0.05


@pytest.mark.parametrize("direction", ["i2t", "t2t"])
def test_other_directions_swap_roles(direction):
    T, I = paired_data(n=80, d=6)
    c = sc.SchurCorrector(direction=direction, ridge=RIDGE).fit(I, T)  # source images, target texts
    *_, gamma, _, _ = bf_blocks(bf_cos(I), bf_cos(T), RIDGE)
    np.testing.assert_allclose(c.gamma_, gamma, atol=1e-9)


# ---------------------------------------------------------------- projection
def test_projection_properties():
    T, I = paired_data(n=150, d=12, seed=5)
    c = sc.SchurCorrector(ridge=RIDGE).fit(T, I)
    *_, R, _ = bf_blocks(bf_cos(T), bf_cos(I), RIDGE)
    lam, V = np.linalg.eigh(R)
    U = V[:, ::-1][:, :3]
    P = c.projection(n_components=3)
    F = c.projection(n_components=3, mode="focus")
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    np.testing.assert_allclose(P @ P, P, atol=1e-10)
    np.testing.assert_allclose(P @ U, 0, atol=1e-10)  # the top-3 directions of R are removed
    rest = V[:, ::-1][:, 3:]
    np.testing.assert_allclose(P @ rest, rest, atol=1e-10)  # everything else is kept
    np.testing.assert_allclose(P + F, np.eye(12), atol=1e-12)
    assert np.trace(P) == pytest.approx(9)


def test_projection_energy_picks_k():
    T, I = paired_data(n=150, d=12, seed=5)
    c = sc.SchurCorrector(ridge=RIDGE).fit(T, I)
    lam = c.explained_eigvals_
    share = np.cumsum(lam) / lam.sum()
    for energy in (0.3, 0.6, 0.9, 1.0):
        k = c.n_components_for_energy(energy)
        assert share[k - 1] >= energy - 1e-12 and (k == 1 or share[k - 2] < energy)
        assert np.trace(c.projection(energy=energy, mode="focus")) == pytest.approx(k)


def test_query_side_projection_ranks_like_reindexed_collection():
    """For inner product, q . (P x) == (P q) . x since P is symmetric: both rankings agree."""
    T, I = paired_data(n=200, d=16, seed=6)
    P = sc.SchurCorrector(ridge=RIDGE).fit(T, I).projection(n_components=4)
    rng = np.random.default_rng(1)
    coll, q = rng.normal(size=(500, 16)), rng.normal(size=16)
    a = np.argsort(-(coll @ P.T) @ q)[:20]
    b = np.argsort(-coll @ (P @ q))[:20]
    assert list(a) == list(b)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_centred_fit_matches_brute_force(method):
    """center=True: Gamma, R and the paired correction from mean-centred features."""
    T, I = paired_data(n=40 if method == "dual" else 100, d=10, seed=8)
    c = sc.SchurCorrector(ridge=RIDGE, method=method, center=True, strength=0.8).fit(T, I)
    assert c.method_ == method
    phi_t, phi_i = bf_cos(T), bf_cos(I)
    mu_t, mu_i = phi_t.mean(axis=0), phi_i.mean(axis=0)
    *_, gamma, R, _ = bf_blocks(phi_t - mu_t, phi_i - mu_i, RIDGE)
    np.testing.assert_allclose(c.gamma_, gamma, atol=1e-9)
    np.testing.assert_allclose(c.explained_eigvals_, np.sort(np.clip(np.linalg.eigvalsh(R), 0, None))[::-1],
                               atol=1e-10)
    T2, I2 = paired_data(n=5, d=10, seed=9)
    expected = bf_cos(I2) - 0.8 * (bf_cos(T2) - mu_t) @ gamma
    np.testing.assert_allclose(c.correct(T2, I2), expected, atol=1e-10)


def test_centred_projection_removes_concept_differences_and_keeps_shared_content():
    """Prompts that name only the concept value, images = shared content + concept + noise.

    Centred, the m - 1 top directions of R span the differences between the concept values'
    mean images: after projecting them out the fitted images' class means coincide (no linear
    probe can beat chance on them) and the content every concept image shares is kept.
    Uncentred, the top m directions also take that shared content away.
    """
    rng = np.random.default_rng(11)
    d, m, n = 32, 5, 500
    shared = np.zeros(d)
    shared[0] = 3.0  # e.g. "a hand": in every concept image, strongly
    concept_vecs = rng.normal(size=(m, d)) * 0.5
    y = np.arange(n) % m
    images = shared + concept_vecs[y] + 0.3 * rng.normal(size=(n, d))
    prompts = (rng.normal(size=(m, d)) + 2.0)[y]  # m distinct prompt embeddings
    phi = bf_cos(images)

    centred = sc.SchurCorrector(ridge=1e-6, center=True).fit(prompts, images)
    assert centred.n_components_for_energy(1.0 - 1e-9) == m - 1  # rank m - 1 once centred
    P = centred.projection(n_components=m - 1)
    means = np.array([(phi @ P)[y == c].mean(axis=0) for c in range(m)])
    assert np.abs(means - means.mean(axis=0)).max() < 1e-8
    raw_means = np.array([phi[y == c].mean(axis=0) for c in range(m)])
    assert np.abs(raw_means - raw_means.mean(axis=0)).max() > 0.05  # there was a concept to remove

    direction = phi.mean(axis=0) / np.linalg.norm(phi.mean(axis=0))  # the shared content
    kept_centred = np.linalg.norm(P @ direction)
    P_uncentred = sc.SchurCorrector(ridge=1e-6).fit(prompts, images).projection(n_components=m)
    kept_uncentred = np.linalg.norm(P_uncentred @ direction)
    assert kept_centred > 0.9 and kept_uncentred < 0.2


# ---------------------------------------------------------------- persistence
@pytest.mark.parametrize("kernel,center", [("cosine", False), ("gaussian", False), ("cosine", True)])
def test_save_load_round_trip(tmp_path, kernel, center):
    T, I = paired_data(n=90, d=7)
    c = sc.SchurCorrector(kernel=kernel, rff_dim=30, strength=0.7, ridge=RIDGE, seed=4, center=center).fit(T, I)
    path = c.save(tmp_path / "sub" / "corr.npz")
    c2 = sc.SchurCorrector.load(path)
    assert c2.get_params() == c.get_params()
    np.testing.assert_array_equal(c2.correct(T[:5], I[:5]), c.correct(T[:5], I[:5]))
    if kernel == "cosine":
        np.testing.assert_array_equal(c2.projection(n_components=2), c.projection(n_components=2))
        assert c2.feature_map_.sigma is None if hasattr(c2.feature_map_, "sigma") else True
    else:
        np.testing.assert_array_equal(c2.feature_map_.frequencies_, c.feature_map_.frequencies_)
    assert not list((tmp_path / "sub").glob("*.tmp"))  # the temporary file was renamed away


def test_load_rejects_other_versions_and_other_files(tmp_path):
    T, I = paired_data(n=30, d=4)
    path = sc.SchurCorrector().fit(T, I).save(tmp_path / "c.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta["version"] = 999
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="another version"):
        sc.SchurCorrector.load(tmp_path / "old.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="not a saved SchurCorrector"):
        sc.SchurCorrector.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved SchurCorrector"):
        sc.SchurCorrector.load(tmp_path / "other.npz")


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    T, I = paired_data(n=20, d=4)
    with pytest.raises(ValueError, match="same number of rows"):
        sc.sce_score(T, I[:-1])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        sc.sce_score(T[:1], I[:1])
    bad = I.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        sc.SchurCorrector().fit(T, bad)
    with pytest.raises(ValueError, match="ridge"):
        sc.sce_score(T, I, ridge=-1)
    with pytest.raises(ValueError, match="kernel"):
        sc.sce_score(T, I, kernel="poly")
    with pytest.raises(ValueError, match="2-D"):
        sc.sce_score(T[0], I[0])
    with pytest.raises(ValueError, match="same encoder space"):
        sc.sce_score(T, I[:, :3])
    c = sc.SchurCorrector().fit(T, I)
    with pytest.raises(ValueError, match="fitted on 4"):
        c.correct(T[:, :3], I[:, :3])
    with pytest.raises(ValueError, match="not fitted"):
        sc.SchurCorrector().correct(T, I)
    with pytest.raises(ValueError, match="cosine kernel"):
        sc.SchurCorrector(kernel="gaussian", rff_dim=8).fit(T, I).projection(n_components=1)
    with pytest.raises(ValueError, match="not both"):
        c.projection(n_components=1, energy=0.5)
    with pytest.raises(ValueError, match="n_components"):
        c.projection(n_components=99)
    with pytest.raises(ValueError, match="direction"):
        sc.SchurCorrector(direction="x2y").fit(T, I)
    with pytest.raises(ValueError, match="singular"):
        sc.SchurCorrector(ridge=0).fit(np.ones((10, 4)), I[:10])


# ---------------------------------------------------------------- planted concept
def _lstsq_probe_accuracy(X_train, y_train, X_test, y_test, n_classes):
    A = np.hstack([X_train, np.ones((len(X_train), 1))])
    W, *_ = np.linalg.lstsq(A, np.eye(n_classes)[y_train], rcond=None)
    pred = np.argmax(np.hstack([X_test, np.ones((len(X_test), 1))]) @ W, axis=1)
    return float(np.mean(pred == y_test))


def test_planted_concept_is_removed_and_content_stays():
    """Embeddings = content + concept. After nullifying, a linear probe is near chance while
    content retrieval still works."""
    rng = np.random.default_rng(0)
    d, n_classes = 64, 4
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    content_dirs, concept_dirs = basis[:, :48], basis[:, 48:52]
    concept_vecs = 1.5 * concept_dirs.T  # one direction per concept value ("red", "blue", ...)

    def images(n):
        content = rng.normal(size=(n, 48)) @ content_dirs.T
        y = rng.integers(0, n_classes, size=n)
        return content + concept_vecs[y] + 0.05 * rng.normal(size=(n, d)), content, y

    # Preliminary set: prompts that name only the concept value ("red", "blue", ...), paired
    # with images of it; the same prompt always has the same text embedding. The estimate of
    # each concept's mean image carries sampling noise from the content (a probe on 1000
    # images still finds ~0.43 accuracy after nullifying with 400 pairs, ~0.27 with 4000).
    prelim_imgs, _, prelim_y = images(4000)
    prompt_emb = concept_vecs + 0.3 * rng.normal(size=(n_classes, d))
    prelim_texts = prompt_emb[prelim_y]
    corr = sc.SchurCorrector(ridge=RIDGE).fit(prelim_texts, prelim_imgs)
    P = corr.projection(energy=0.99)

    coll, content, y = images(2000)
    before = bf_cos(coll)
    after = bf_cos(before @ P)
    half = 1000
    acc_before = _lstsq_probe_accuracy(before[:half], y[:half], before[half:], y[half:], n_classes)
    acc_after = _lstsq_probe_accuracy(after[:half], y[:half], after[half:], y[half:], n_classes)
    assert acc_before > 0.95
    assert acc_after < 1 / n_classes + 0.06  # near chance (0.25)

    def recall_at_10(emb):
        q = bf_cos(content[:200] + 0.5 * rng.normal(size=(200, d)) @ content_dirs @ content_dirs.T)
        top = np.argsort(-(q @ emb.T), axis=1)[:, :10]
        return float(np.mean([i in row for i, row in enumerate(top)]))

    r_before, r_after = recall_at_10(before), recall_at_10(after)
    assert r_after >= 0.9 * r_before and r_after > 0.5


# ---------------------------------------------------------------- scikit-learn conventions
def test_sklearn_clone_gives_an_unfitted_copy_that_fits_the_same():
    from sklearn.base import clone

    T, I = paired_data(n=80, d=6)
    fitted = sc.SchurCorrector(kernel="gaussian", rff_dim=20, ridge=1e-3, strength=0.7, seed=5,
                               center=True).fit(T, I)
    copy = clone(fitted)
    assert copy is not fitted and type(copy) is sc.SchurCorrector
    assert copy.get_params(deep=True) == fitted.get_params(deep=True) == fitted.get_params(deep=False)
    assert not hasattr(copy, "gamma_") and not hasattr(copy, "feature_map_")  # clone copies no fit
    with pytest.raises(ValueError, match="not fitted"):
        copy.correct(T, I)
    copy.fit(T, I)
    np.testing.assert_array_equal(copy.gamma_, fitted.gamma_)
    np.testing.assert_array_equal(copy.correct(T[:5], I[:5]), fitted.correct(T[:5], I[:5]))


def test_get_and_set_params_follow_sklearn():
    from sklearn.base import clone

    c = sc.SchurCorrector()
    names = ["direction", "kernel", "ridge", "strength", "sigma", "rff_dim", "seed", "method", "center"]
    assert list(c.get_params()) == names
    assert c.set_params(strength=0.25, center=True) is c
    assert c.strength == 0.25 and c.center is True
    assert clone(c).get_params() == c.get_params()
    with pytest.raises(ValueError, match="invalid parameter 'alpha'"):
        c.set_params(alpha=1)
    # __init__ only stores: an invalid value is accepted by the constructor and refused by fit
    bad = sc.SchurCorrector(kernel="poly")
    assert clone(bad).kernel == "poly"
    with pytest.raises(sc.InputError, match="kernel"):
        bad.fit(*paired_data(n=10, d=4))


def test_sce_correct_does_not_import_sklearn():
    import subprocess
    import sys

    code = "import sys, sce_correct; sce_correct.SchurCorrector().get_params(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- numbers out of range
def _prompt_pairs(m: int, per: int = 6, d: int = 16, seed: int = 0):
    """m distinct prompts, each paired with `per` images: R has rank m (m - 1 when centred)."""
    rng = np.random.default_rng(seed)
    prompts = rng.standard_normal((m, d))
    T = np.repeat(prompts, per, axis=0)
    I = T @ rng.standard_normal((d, d)) * 0.5 + rng.standard_normal((m * per, d))
    return T, I


@pytest.mark.parametrize("center", [False, True])
def test_n_directions_is_the_rank_of_R(center):
    m, d = 4, 16
    T, I = _prompt_pairs(m, d=d)
    c = sc.SchurCorrector(ridge=1e-6, center=center).fit(T, I)
    # Brute force: R = C_TS (C_S + eps I)^-1 C_ST from the (centred) cosine features, its rank by SVD.
    S, Y = bf_cos(T), bf_cos(I)
    if center:
        S, Y = S - S.mean(0), Y - Y.mean(0)
    n = len(S)
    C_S, C_ST = S.T @ S / n, S.T @ Y / n
    R = C_ST.T @ np.linalg.solve(C_S + 1e-6 * np.eye(d), C_ST)
    rank = np.linalg.matrix_rank(R, tol=1e-9 * np.linalg.norm(R, 2))
    assert rank == (m - 1 if center else m)
    assert c.n_directions() == rank
    assert c.n_components_for_energy(1.0) <= rank
    c.projection(n_components=rank)  # fine
    for too_many in (rank + 1, d):
        with pytest.raises(sc.InputError, match=rf"between 1 and {rank}, got {too_many}: the concept has {rank} "):
            c.projection(n_components=too_many)
    with pytest.raises(sc.InputError, match="whole number"):
        c.projection(n_components=1.5)


def test_removing_every_dimension_is_refused():
    T, I = paired_data(n=200, d=4)  # as many distinct prompts as rows: R has full rank
    c = sc.SchurCorrector(ridge=1e-6).fit(T, I)
    assert c.n_directions() == 4
    assert np.abs(c.projection(n_components=4, mode="focus") - np.eye(4)).max() < 1e-8
    with pytest.raises(sc.InputError, match="removes all 4 dimensions"):
        c.projection(n_components=4)


@pytest.mark.parametrize("strength", [1e308, -1e300, 1e20])
def test_a_strength_that_would_overflow_is_refused(strength):
    T, I = paired_data(n=50, d=6)
    with pytest.raises(sc.InputError, match="strength .* too large") as error:
        sc.SchurCorrector(strength=strength).fit(T, I)
    usable = float(str(error.value).split("|strength| <= ")[1].split(" ")[0])
    ok = sc.SchurCorrector(strength=usable).fit(T, I)  # the bound the message names works
    assert np.isfinite(ok.correct(T, I)).all()
    assert np.abs(ok.explained(T)).max() <= sc.corrector.MAX_CORRECTION_NORM
    with pytest.raises(sc.InputError, match="too large"):  # set after fitting: refused when used
        ok.set_params(strength=strength).correct(T, I)


@pytest.mark.parametrize("strength", [np.inf, -np.inf, np.nan])
def test_a_strength_that_is_not_finite_is_refused(strength):
    T, I = paired_data(n=20, d=4)
    with pytest.raises(sc.InputError, match="strength must be a finite number"):
        sc.SchurCorrector(strength=strength).fit(T, I)


@pytest.mark.parametrize("sigma", [1e-200, 1e200, np.nan, np.inf, 0.0, -1.0])
def test_a_sigma_outside_the_usable_range_is_refused(sigma):
    T, I = paired_data(n=20, d=4)
    with pytest.raises(sc.InputError, match="sigma must be a positive number between"):
        sc.SchurCorrector(kernel="gaussian", sigma=sigma, rff_dim=10).fit(T, I)
    with pytest.raises(sc.InputError, match="sigma"):
        sc.sce_score(T, I, kernel="gaussian-exact", sigma=sigma)


# -- centring within groups ------------------------------------------------------------------
def _brute_group_fit(source, target, groups, ridge):
    """R and Gamma from unit rows minus their group's mean, by explicit loops and an inverse."""
    S = source / np.linalg.norm(source, axis=1, keepdims=True)
    T = target / np.linalg.norm(target, axis=1, keepdims=True)
    S, T = S.copy(), T.copy()
    for g in set(groups.tolist()):
        rows = groups == g
        S[rows] -= S[rows].mean(axis=0)
        T[rows] -= T[rows].mean(axis=0)
    n, d = S.shape
    C_S, C_ST = S.T @ S / n, S.T @ T / n
    gamma = np.linalg.inv(C_S + ridge * np.eye(d)) @ C_ST
    return C_ST.T @ gamma, gamma


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_groups_centre_within_each_group_like_a_brute_force_fit(method):
    rng = np.random.default_rng(11)
    n, d = 60, 8
    groups = np.repeat(np.arange(12), 5)  # 12 objects, 5 concept values each
    source = rng.normal(size=(n, d)) + 3 * rng.normal(size=(12, d))[groups]  # strong per-group offsets
    target = source @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=(n, d))
    fitted = sc.SchurCorrector(center=True, method=method, ridge=1e-3).fit(source, target, groups=groups)
    R, gamma = _brute_group_fit(source, target, groups, 1e-3)
    np.testing.assert_allclose(fitted.gamma_, gamma, rtol=1e-7, atol=1e-9)
    lam = np.sort(np.linalg.eigvalsh(R))[::-1]
    np.testing.assert_allclose(fitted.explained_eigvals_, np.clip(lam, 0, None), rtol=1e-7, atol=1e-10)
    vec = np.linalg.eigh(R)[1][:, ::-1][:, :3]
    np.testing.assert_allclose(fitted.projection(n_components=3), np.eye(d) - vec @ vec.T, atol=1e-7)


def test_one_group_is_the_ordinary_centred_fit_and_bad_groups_are_named():
    rng = np.random.default_rng(12)
    source, target = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    grouped = sc.SchurCorrector(center=True).fit(source, target, groups=np.zeros(30))
    plain = sc.SchurCorrector(center=True).fit(source, target)
    np.testing.assert_allclose(grouped.gamma_, plain.gamma_, rtol=1e-8, atol=1e-10)
    with pytest.raises(sc.InputError, match="need center=True"):
        sc.SchurCorrector(center=False).fit(source, target, groups=np.zeros(30))
    with pytest.raises(sc.InputError, match="one label per pair"):
        sc.SchurCorrector(center=True).fit(source, target, groups=np.zeros(29))
    with pytest.raises(sc.InputError, match="group of its own"):
        sc.SchurCorrector(center=True).fit(source, target, groups=np.arange(30))
