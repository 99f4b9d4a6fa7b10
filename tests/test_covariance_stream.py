"""Collection-scale mathematics (issue 13): covariances summed batch by batch give the
in-memory numbers, and the streaming forms never hold an (n, D) array.

The accumulator is checked against numpy in extended precision on seeded data; the
streaming score, fit, modes and collection report against the in-memory functions.
"""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import sce_correct as sc
from indexing.catalog import EmbeddingKind
from indexing.collection import Collection, NewItem

RIDGE = 1e-3


def paired_data(n=600, d=12, seed=0, offset=0.3):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, d))
    I = 0.8 * T @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.6 * rng.normal(size=(n, d)) + offset
    return T, I


def exact_covariances(X, Y, center):
    """Reference in long double (80-bit on x86): X'X/n, Y'Y/n, X'Y/n, centred or not."""
    X, Y = X.astype(np.longdouble), Y.astype(np.longdouble)
    if center:
        X, Y = X - X.mean(axis=0), Y - Y.mean(axis=0)
    n = len(X)
    return [np.asarray(M, dtype=np.float64) for M in (X.T @ X / n, Y.T @ Y / n, X.T @ Y / n)]


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def splits(n, sizes):
    edges = np.cumsum(sizes)[:-1]
    return np.split(np.arange(n), edges)


SPLITTINGS = {
    "one batch": [2000],
    "equal": [500] * 4,
    "uneven with single rows": [1, 1, 997, 3, 600, 398],
    "many small": [37] * 54 + [2],
}


# ------------------------------------------------------------------------- the accumulator
@pytest.mark.parametrize("splitting", list(SPLITTINGS))
@pytest.mark.parametrize("offset", [0.0, 1e6])
@pytest.mark.parametrize("center", [False, True])
def test_accumulator_matches_extended_precision_numpy(splitting, offset, center):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, 7)) * 0.5 + offset
    Y = 0.3 * X[:, :5] + rng.normal(size=(2000, 5)) - 2 * offset
    acc = sc.CovarianceAccumulator()
    for rows in splits(2000, SPLITTINGS[splitting]):
        acc.update(X[rows], Y[rows])
    cov = acc.covariances(center=center)
    for got, want in zip((cov.C_XX, cov.C_YY, cov.C_XY), exact_covariances(X, Y, center)):
        assert relative_error(got, want) < 1e-10
    np.testing.assert_allclose(cov.mean_x, X.astype(np.longdouble).mean(axis=0).astype(np.float64), rtol=1e-13)
    assert cov.n == 2000 and cov.centered == center


def test_large_offset_centred_beats_the_naive_formula():
    """With a 1e6 offset the one-pass X'X/n - m m' loses every digit; the accumulator does not."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3000, 4)) + 1e6
    want = exact_covariances(X, X, True)[0]
    naive = X.T @ X / len(X) - np.outer(X.mean(axis=0), X.mean(axis=0))
    assert relative_error(naive, want) > 1e-3
    assert relative_error(sc.covariances(X, center=True).C_XX, want) < 1e-10


def test_merge_in_any_order_equals_one_pass():
    X, Y = paired_data(n=1500, d=6, offset=1e4)
    parts = [sc.CovarianceAccumulator().update(X[r], Y[r]) for r in splits(1500, [100, 700, 1, 699])]
    whole = sc.CovarianceAccumulator().update(X, Y).covariances(center=True)
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]]
    for order in orders:
        merged = sc.CovarianceAccumulator()
        for i in order:
            merged.merge(parts[i])
        got = merged.covariances(center=True)
        for a, b in zip((got.C_XX, got.C_YY, got.C_XY), (whole.C_XX, whole.C_YY, whole.C_XY)):
            assert relative_error(a, b) < 1e-10
    # a tree of merges (two workers, each with two shards), and merge leaves its argument alone
    left = sc.CovarianceAccumulator().merge(parts[0]).merge(parts[1])
    right = sc.CovarianceAccumulator().merge(parts[2]).merge(parts[3])
    before = right.covariances().C_XY.copy()
    tree = left.merge(right).covariances(center=True)
    assert relative_error(tree.C_XY, whole.C_XY) < 1e-10
    np.testing.assert_array_equal(right.covariances().C_XY, before)
    assert left.merge(sc.CovarianceAccumulator()).n == 1500  # an empty accumulator adds nothing


@pytest.mark.parametrize("center", [False, True])
def test_without_yy_the_other_blocks_are_the_same(center):
    X, Y = paired_data(n=900, d=5, offset=30.0)
    full, cross = sc.CovarianceAccumulator(), sc.CovarianceAccumulator(with_yy=False)
    for rows in splits(900, [300, 1, 599]):
        full.update(X[rows], Y[rows])
        cross.update(X[rows], Y[rows])
    a, b = full.covariances(center=center), cross.covariances(center=center)
    assert b.C_YY is None
    for got, want in ((b.C_XX, a.C_XX), (b.C_XY, a.C_XY), (b.mean_y, a.mean_y)):
        assert relative_error(got, want) < 1e-12
    with pytest.raises(sc.InputError, match="with_yy"):
        full.merge(cross)


def test_without_the_shift_uncentred_covariances_stay_exact():
    """shift=False (the score's accumulator): the uncentred numbers need no shift, even 1e6 off
    the origin and merged; centred ones are refused."""
    rng = np.random.default_rng(13)
    X = rng.normal(size=(3000, 6)) + 1e6
    Y = rng.normal(size=(3000, 4)) - 1e6
    parts = [sc.CovarianceAccumulator(shift=False).update(X[r], Y[r]) for r in splits(3000, [1000, 7, 1993])]
    merged = parts[2].merge(parts[0]).merge(parts[1])
    got = merged.covariances()
    for a, b in zip((got.C_XX, got.C_YY, got.C_XY), exact_covariances(X, Y, False)):
        assert relative_error(a, b) < 1e-12
    with pytest.raises(sc.InputError, match="shift=True"):
        merged.covariances(center=True)
    assert not sc.CovarianceAccumulator().merge(parts[1]).shift  # a merge keeps the weaker guarantee


def test_float32_batches_are_summed_in_float64():
    """float32 rows: products in float32 per batch, sums in float64: ~1e-6 of the float64
    numbers of the same values, even with an offset and 200 batches."""
    rng = np.random.default_rng(5)
    X = (rng.normal(size=(20000, 6)) + 50).astype(np.float32)
    Y = (rng.normal(size=(20000, 6)) - 20).astype(np.float32)
    acc = sc.CovarianceAccumulator()
    for rows in splits(20000, [100] * 200):
        acc.update(X[rows], Y[rows])
    for center in (False, True):
        cov = acc.covariances(center=center)
        assert cov.C_XX.dtype == np.float64
        for got, want in zip((cov.C_XX, cov.C_YY, cov.C_XY), exact_covariances(X, Y, center)):
            assert relative_error(got, want) < 2e-6


def test_one_side_copy_and_errors():
    X, Y = paired_data(n=50, d=3)
    X_before = X.copy()
    cov = sc.CovarianceAccumulator().update(X).update(X).covariances()
    np.testing.assert_array_equal(X, X_before)  # copy=True (the default) leaves the input alone
    assert cov.C_YY is None and cov.C_XY is None and cov.n == 100
    assert relative_error(cov.C_XX, X.T @ X / 50) < 1e-12
    acc = sc.CovarianceAccumulator().update(X, Y)
    with pytest.raises(sc.InputError, match="earlier ones"):
        acc.update(X[:, :2], Y)
    with pytest.raises(sc.InputError, match="same number of rows"):
        acc.update(X, Y[:10])
    with pytest.raises(sc.InputError, match="NaN"):
        acc.update(np.full((2, 3), np.nan), Y[:2])
    with pytest.raises(sc.InputError, match="no rows"):
        sc.CovarianceAccumulator().covariances()


# ----------------------------------------------------------------- streaming score and fit
def batches(T, I, size):
    return ((T[i:i + size], I[i:i + size]) for i in range(0, len(T), size))


KERNELS = [("cosine", {}), ("gaussian", {"sigma": 4.0, "rff_dim": 40})]


@pytest.mark.parametrize("kernel,kw", KERNELS)
def test_streaming_score_equals_in_memory(kernel, kw):
    T, I = paired_data(n=900, d=12, seed=1)  # n > D: the in-memory score is primal too
    a = sc.sce_score(T, I, kernel=kernel, ridge=RIDGE, **kw)
    assert a.method == "primal"
    for size in (900, 64, 7):
        b = sc.sce_score_batches(batches(T, I, size), kernel=kernel, ridge=RIDGE, **kw)
        for field in ("image_diversity", "text_diversity", "image_share", "text_share", "vendi", "rke"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-10), field
        assert (b.n, b.kernel, b.sigma) == (a.n, a.kernel, a.sigma)
    # two workers' partial sums, merged
    halves = [sc.CovarianceAccumulator(), sc.CovarianceAccumulator()]
    fmap = sc.CosineFeatures() if kernel == "cosine" else sc.RandomFourierFeatures(
        sigma=kw["sigma"], n_components=kw["rff_dim"])
    fmap.fit(T)
    for k, (t, i) in enumerate(batches(T, I, 100)):
        halves[k % 2].update(fmap.transform(t), fmap.transform(i))
    c = sc.sce_score_from_covariances(halves[1].merge(halves[0]).covariances(), ridge=RIDGE, kernel=kernel)
    assert c.image_diversity == pytest.approx(a.image_diversity, rel=1e-10)
    assert c.vendi == pytest.approx(a.vendi, rel=1e-10)


def test_streaming_score_equals_the_dual_when_n_is_small():
    T, I = paired_data(n=30, d=40, seed=2)  # n < D: the in-memory score works in the dual
    a = sc.sce_score(T, I, ridge=RIDGE)
    b = sc.sce_score_batches(batches(T, I, 8), ridge=RIDGE)
    assert a.method == "dual" and b.method == "primal"
    for field in ("image_diversity", "text_diversity", "image_share", "vendi", "rke"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-7), field


@pytest.mark.parametrize("kernel,kw", KERNELS)
@pytest.mark.parametrize("center", [False, True])
def test_fit_batches_and_partial_fit_equal_fit(kernel, kw, center):
    T, I = paired_data(n=800, d=10, seed=6)
    a = sc.SchurCorrector(kernel=kernel, ridge=RIDGE, center=center, strength=0.7, **kw).fit(T, I)
    b = sc.SchurCorrector(kernel=kernel, ridge=RIDGE, center=center, strength=0.7, **kw).fit_batches(
        batches(T, I, 61))
    c = sc.SchurCorrector(kernel=kernel, ridge=RIDGE, center=center, strength=0.7, **kw)
    for t, i in batches(T, I, 200):
        c.partial_fit(t, i)
    T2, I2 = paired_data(n=9, d=10, seed=7)
    for other in (b, c):
        assert other.n_samples_ == 800 and other.method_ == "primal"
        np.testing.assert_allclose(other.gamma_, a.gamma_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(other.correct(T2, I2), a.correct(T2, I2), rtol=1e-10, atol=1e-12)
        if center:
            np.testing.assert_allclose(other.source_mean_, a.source_mean_, rtol=1e-12)
        if kernel == "cosine":
            np.testing.assert_allclose(other.explained_eigvals_, a.explained_eigvals_, rtol=1e-9, atol=1e-14)
            for k in (1, 3):
                np.testing.assert_allclose(other.projection(n_components=k), a.projection(n_components=k),
                                           atol=1e-9)


def test_partial_fit_is_usable_after_each_batch_and_fit_starts_over():
    T, I = paired_data(n=400, d=6, seed=8)
    c = sc.SchurCorrector(ridge=RIDGE)
    c.partial_fit(T[:150], I[:150])
    np.testing.assert_allclose(c.gamma_, sc.SchurCorrector(ridge=RIDGE, method="primal").fit(T[:150], I[:150]).gamma_,
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(sc.InputError, match="columns"):  # a bad batch leaves the fit as it was
        c.partial_fit(T[150:, :3], I[150:, :3])
    assert c.n_samples_ == 150
    c.fit(T, I)
    with pytest.raises(sc.InputError, match="without running sums"):
        c.partial_fit(T[:10], I[:10])


def test_streaming_needs_sigma_and_a_finite_feature_map():
    T, I = paired_data(n=40, d=4)
    with pytest.raises(sc.InputError, match="needs sigma"):
        sc.sce_score_batches(batches(T, I, 10), kernel="gaussian")
    with pytest.raises(sc.InputError, match="no finite feature map"):
        sc.sce_score_batches(batches(T, I, 10), kernel="gaussian-exact", sigma=1.0)
    with pytest.raises(sc.InputError, match="needs sigma"):
        sc.SchurCorrector(kernel="gaussian").fit_batches(batches(T, I, 10))
    with pytest.raises(sc.InputError, match="primal"):
        sc.SchurCorrector(method="dual").fit_batches(batches(T, I, 10))
    with pytest.raises(sc.InputError, match="at least 2 pairs"):
        sc.sce_score_batches(iter([(T[:1], I[:1])]))
    with pytest.raises(sc.InputError, match="pair up"):
        sc.sce_score_batches(iter([(T[:5], I[:4])]))


@pytest.mark.parametrize("kernel,kw", KERNELS)
def test_streamed_modes_equal_in_memory_modes(kernel, kw):
    T, I = paired_data(n=700, d=12, seed=9)
    spectra, original, schur = sc.paired_spectra_and_modes(
        batches(T, I, 90), lambda: (I[i:i + 33] for i in range(0, 700, 33)), n_modes=4, top=6,
        kernel=kernel, ridge=RIDGE, **kw)
    ref = sc.schur_spectra(T, I, kernel=kernel, ridge=RIDGE, **kw)
    for name in ("image", "explained", "schur"):
        np.testing.assert_allclose(getattr(spectra, name), getattr(ref, name), atol=1e-12)
    expected = (sc.kernel_modes(I, n_modes=4, top=6, kernel=kernel, **kw)
                + sc.schur_modes(T, I, n_modes=4, top=6, kernel=kernel, ridge=RIDGE, **kw))
    for got, want in zip(original + schur, expected, strict=True):
        assert got.rank == want.rank
        assert got.eigenvalue == pytest.approx(want.eigenvalue, rel=1e-9)
        assert got.share == pytest.approx(want.share, rel=1e-9)
        assert got.top_indices.tolist() == want.top_indices.tolist()
        np.testing.assert_allclose(got.top_scores, want.top_scores, rtol=1e-9)
        assert got.scores is None  # per-image scores are not kept when streamed


def test_mode_ranker_keeps_the_stable_sort_and_sign_rule():
    rng = np.random.default_rng(10)
    scores = np.round(rng.normal(size=(300, 3)), 1)  # many ties
    scores[:, 1] *= -1
    want = sc.modes._modes_from_scores(np.ones(3), scores, 3.0, 7)
    ranker = sc.ModeRanker(np.ones(3), 3.0, 7)
    for rows in splits(300, [1, 50, 13, 200, 36]):
        ranker.update_scores(scores[rows])
    for got, ref in zip(ranker.modes(), want):
        assert got.top_indices.tolist() == ref.top_indices.tolist()
        np.testing.assert_array_equal(got.top_scores, ref.top_scores)
    # the reference rule, written out: flip so the first largest |score| is positive, stable sort
    for j, mode in enumerate(want):
        s = scores[:, j] * (1 if scores[np.argmax(np.abs(scores[:, j])), j] >= 0 else -1)
        assert mode.top_indices.tolist() == np.argsort(-s, kind="stable")[:7].tolist()


# ------------------------------------------------------------------------------- memory
def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_never_holds_an_n_by_D_array():
    n, d, size = 40_000, 48, 500
    whole = n * d * 8  # one (n, D) float64 array: 15 MB

    def generate():
        rng = np.random.default_rng(11)
        for _ in range(n // size):
            t = rng.normal(size=(size, d))
            yield t, 0.5 * t + rng.normal(size=(size, d))

    score = lambda: sc.sce_score_batches(generate(), ridge=RIDGE)  # noqa: E731
    fit = lambda: sc.SchurCorrector(ridge=RIDGE, center=True).fit_batches(generate())  # noqa: E731
    modes = lambda: sc.paired_spectra_and_modes(  # noqa: E731
        generate(), lambda: (i for _, i in generate()), n_modes=3, top=5, ridge=RIDGE)
    for run in (score, fit, modes):
        assert _peak_bytes(run) < whole / 10
    # the check can tell: the features of every row at once are counted
    T, _ = (np.concatenate(side) for side in zip(*generate()))
    assert _peak_bytes(lambda: sc.CosineFeatures().fit(T).transform(T)) > whole
    # and the in-memory score sums its arrays in row blocks too, never making their (n, D) features
    T, I = (np.concatenate(side) for side in zip(*generate()))
    assert _peak_bytes(lambda: sc.sce_score(T, I, ridge=RIDGE)) < whole / 3  # (isfinite: n x d bytes)


# ---------------------------------------------------------------------- collection report
def _captioned_collection(tmp_path: Path, n: int, dim: int, store_captions: bool):
    from conftest import ToyEncoder

    encoder = ToyEncoder(dim=dim)
    collection = Collection.open(tmp_path / "coll", create=True)
    collection.bind_encoder(encoder.name, encoder.dim)
    rng = np.random.default_rng(12)
    captions = [f"item {k % 23}" for k in range(n)]
    text = encoder.encode_texts(captions)
    images = (0.6 * text @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + rng.normal(size=(n, dim)) + 0.5)
    items = [NewItem(uri=f"/img/{k}.png", sha256=f"{k:064d}", width=2, height=2, caption=captions[k],
                     metadata={"half": "a" if k % 2 else "b"}) for k in range(n)]
    ids = collection.add_items(items, images.astype(np.float32))
    if store_captions:
        collection.store_embeddings(EmbeddingKind.CAPTION, ids, text.astype(np.float32))
    return collection, encoder


def _in_memory(collection, encoder, where, *, kernel, ridge, n_modes, top, rff_dim=2500):
    """The report's numbers from every vector loaded at once, through the in-memory functions
    of sce_correct (not the report's code): score, spectra, and modes as (uri, caption, score)."""
    from indexing.encoders.encoder import encode_texts_once

    ids = collection.item_ids(where, captioned=True)
    records = collection.items(ids)
    image = collection.embeddings.get(EmbeddingKind.IMAGE, ids)
    captions = [records[i].caption for i in ids.tolist()]
    try:
        text = collection.embeddings.get(EmbeddingKind.CAPTION, ids)
    except KeyError:
        text = encode_texts_once(encoder, captions)
    # the report works on unit rows (as corrections are fitted), whatever the stored scale
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    kw = dict(kernel=kernel, rff_dim=rff_dim)
    spectra = sc.schur_spectra(text, image, ridge=ridge, **kw)
    kw["sigma"] = spectra.sigma
    modes = {"original_modes": sc.kernel_modes(image, n_modes=n_modes, top=top, **kw),
             "schur_modes": sc.schur_modes(text, image, n_modes=n_modes, top=top, ridge=ridge, **kw)}
    items = {kind: [[(int(i), records[int(ids[i])].uri, captions[i], float(score))
                     for i, score in zip(m.top_indices, m.top_scores)] for m in found]
             for kind, found in modes.items()}
    return sc.report_from_spectra(spectra, ridge=ridge), spectra, modes, items


@pytest.mark.parametrize("kernel,n,store_captions", [("cosine", 300, True), ("cosine", 300, False),
                                                     ("gaussian", 2400, True)])
def test_collection_report_is_streamed_and_equals_the_in_memory_report(tmp_path, monkeypatch, kernel, n,
                                                                      store_captions):
    from retrieval import report as report_module

    collection, encoder = _captioned_collection(tmp_path, n, dim=8, store_captions=store_captions)
    where = {"half": "a"}
    kw = dict(kernel=kernel, ridge=RIDGE, n_modes=3, top=4)
    if kernel == "gaussian":
        kw["rff_dim"] = 30  # D = 60 <= n/2: streamed; 2n > 2000: sigma's median on a sample
    want = _in_memory(collection, encoder, where, **kw)
    requested = []
    real_get = collection.embeddings.get

    def counting_get(kind, ids):
        requested.append(len(ids))
        return real_get(kind, ids)

    monkeypatch.setattr(collection.embeddings, "get", counting_get)
    monkeypatch.setattr(report_module, "_report_in_memory", None)  # the streamed path, or a TypeError
    got = report_module.report_for_collection(collection, encoder, where=where, chunk_rows=41, **kw)
    chunked = [size for size in requested if size <= 41]
    # chunks only, but for the median heuristic's sample of texts and images (gaussian, sigma=None)
    assert len(requested) - len(chunked) == (2 if kernel == "gaussian" else 0)
    assert sum(chunked) >= (2 + store_captions) * (n // 2)  # both passes read every image
    assert got.source == f"collection where {where}, {n // 2} items"
    score, spectra, modes, items = want
    assert got.score.sigma == score.sigma  # the same median sample, read from the store
    # float32 vectors: the products run in float32, batch by batch here, so ~1e-7 apart
    for field in ("image_diversity", "text_diversity", "image_share", "text_share", "vendi", "rke"):
        assert getattr(got.score, field) == pytest.approx(getattr(score, field), rel=1e-6), field
    for field, name in (("spectrum_image", "image"), ("spectrum_explained", "explained"),
                        ("spectrum_schur", "schur")):
        np.testing.assert_allclose(getattr(got, field), getattr(spectra, name)[:50], rtol=1e-5, atol=1e-9)
    for kind in ("original_modes", "schur_modes"):
        for view, mode, expected in zip(getattr(got, kind), modes[kind], items[kind], strict=True):
            assert view.eigenvalue == pytest.approx(mode.eigenvalue, rel=1e-6)
            assert [(i.index, i.uri, i.prompt) for i in view.items] == [e[:3] for e in expected]
            np.testing.assert_allclose([i.score for i in view.items], [e[3] for e in expected], rtol=1e-5)
    # the in-memory report of the loaded rows is the same computation with one batch
    from retrieval.report import report_from_embeddings
    ids = collection.item_ids(where, captioned=True)
    records = collection.items(ids)
    text = (real_get(EmbeddingKind.CAPTION, ids) if store_captions
            else encoder.encode_texts([records[i].caption for i in ids.tolist()]))
    whole = report_from_embeddings(text, real_get(EmbeddingKind.IMAGE, ids), [records[i].uri for i in ids.tolist()],
                                   [records[i].caption for i in ids.tolist()], **kw)
    assert whole.score.image_diversity == pytest.approx(got.score.image_diversity, rel=1e-6)
    assert [[i.index for i in m.items] for m in whole.schur_modes] == [[i.index for i in m.items]
                                                                      for m in got.schur_modes]
    collection.close()


@pytest.mark.parametrize("kernel", ["cosine", "gaussian"])
def test_report_does_not_depend_on_the_scale_of_raw_embeddings(kernel):
    # open_clip's raw outputs are not unit-norm: the report (like a fitted correction) reads unit rows
    from retrieval.report import report_from_embeddings

    rng = np.random.default_rng(4)
    text = rng.normal(size=(60, 6))
    image = 0.7 * text @ rng.normal(size=(6, 6)) + rng.normal(size=(60, 6))
    names = [f"/img/{k}.png" for k in range(60)]
    kw = dict(kernel=kernel, n_modes=2, top=3, rff_dim=40)
    unit = report_from_embeddings(text / np.linalg.norm(text, axis=1, keepdims=True),
                                  image / np.linalg.norm(image, axis=1, keepdims=True), names, names, **kw)
    scaled = report_from_embeddings(7.0 * text * rng.uniform(0.5, 2.0, size=(60, 1)), 3.0 * image, names, names, **kw)
    if kernel == "gaussian":  # the bandwidth of unit rows, not of the raw scale
        assert scaled.score.sigma == pytest.approx(unit.score.sigma, rel=1e-12) and unit.score.sigma < 2.0
    assert scaled.score.image_share == pytest.approx(unit.score.image_share, rel=1e-9)
    assert scaled.spectrum_schur == pytest.approx(unit.spectrum_schur, rel=1e-9, abs=1e-12)
