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
