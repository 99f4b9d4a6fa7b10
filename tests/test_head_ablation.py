"""sce_correct.HeadAblation (mean-ablating the heads that carry a concept), checked against
brute-force loops on seeded random head terms with a planted concept."""
from __future__ import annotations

import numpy as np
import pytest

from sce_correct import HeadAblation, InputError, SchurCorrector, load_corrector
from sce_correct.heads import concept_basis

N, LAYERS, HEADS, DIM = 60, 3, 4, 16


def planted(seed: int = 0, carriers=((2, 1), (0, 3)), strengths=(3.0, 1.5)):
    """Head terms with noise, plus a concept (4 prompts' spread) written by ``carriers``."""
    rng = np.random.default_rng(seed)
    prompts = rng.normal(size=(4, DIM))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    C = rng.normal(scale=0.3, size=(N, LAYERS, HEADS, DIM))
    value = rng.integers(0, 4, size=N)  # each image shows one concept value
    for (layer, head), strength in zip(carriers, strengths):
        C[:, layer, head] += strength * prompts[value]
    return C, prompts


def brute_concept_variance(C, prompts):
    """tr(P Cov P) with P the projector onto span{t_i - t_0} of the unit prompts, head by head."""
    T = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
    D = (T[1:] - T[0]).T  # d x (m-1)
    P = D @ np.linalg.pinv(D)
    out = np.zeros(C.shape[1:3])
    for layer in range(C.shape[1]):
        for head in range(C.shape[2]):
            cov = np.cov(C[:, layer, head].T, bias=True)
            out[layer, head] = np.trace(P @ cov @ P)
    return out


def test_concept_basis_spans_the_prompt_differences():
    _, prompts = planted()
    U = concept_basis(prompts)
    T = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
    D = (T[1:] - T[0]).T
    assert U.shape == (DIM, 3)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(U @ U.T, D @ np.linalg.pinv(D), atol=1e-10)


def test_concept_variance_equals_the_brute_force_trace():
    C, prompts = planted(seed=1)
    fitted = HeadAblation(n_heads=2).fit(C, prompts)
    np.testing.assert_allclose(fitted.concept_variance_, brute_concept_variance(C, prompts), rtol=1e-10)
    np.testing.assert_allclose(fitted.total_variance_, C.var(axis=0).sum(axis=-1), rtol=1e-10)


def test_the_planted_carriers_rank_first_strongest_first():
    C, prompts = planted(seed=2)
    fitted = HeadAblation(n_heads=2).fit(C, prompts)
    assert fitted.heads_.tolist() == [[2, 1], [0, 3]]
    assert fitted.head_names == ["L2H1", "L0H3"]


@pytest.mark.parametrize("share", [0.3, 0.6, 0.9, 0.99, 1.0])
def test_share_picks_the_fewest_heads_reaching_it(share):
    C, prompts = planted(seed=3)
    fitted = HeadAblation(share=share).fit(C, prompts)
    ranked = np.sort(brute_concept_variance(C, prompts).ravel())[::-1]
    cumulative = np.cumsum(ranked) / ranked.sum()
    want = next(i + 1 for i, c in enumerate(cumulative) if c >= share - 1e-12)
    assert len(fitted.heads_) == want
    assert fitted.explained_share_ == pytest.approx(cumulative[want - 1])


def test_transform_equals_a_loop_over_the_ablated_heads():
    C, prompts = planted(seed=4)
    rng = np.random.default_rng(40)
    rest = rng.normal(size=(N, DIM))  # stem + MLPs
    x = rest + C.sum(axis=(1, 2))
    reference = rng.normal(size=(LAYERS, HEADS, DIM))
    fitted = HeadAblation(n_heads=3).fit(C, prompts, reference_means=reference)
    want = x.copy()
    for layer, head in fitted.heads_:
        want = want - C[:, layer, head] + reference[layer, head]
    np.testing.assert_allclose(fitted.transform(x, C), want, rtol=1e-12)


def test_ablating_every_head_leaves_the_rest_plus_the_means():
    C, prompts = planted(seed=5)
    rest = np.random.default_rng(50).normal(size=(N, DIM))
    fitted = HeadAblation(n_heads=LAYERS * HEADS).fit(C, prompts)
    got = fitted.transform(rest + C.sum(axis=(1, 2)), C)
    np.testing.assert_allclose(got, rest + C.mean(axis=0).sum(axis=(0, 1)), atol=1e-10)


def test_ablating_the_carriers_removes_the_concept_from_the_embeddings():
    """A linear read-out of the concept value from the embeddings falls to chance."""
    C, prompts = planted(seed=6, strengths=(3.0, 3.0))
    rest = np.random.default_rng(60).normal(scale=0.3, size=(N, DIM))
    x = rest + C.sum(axis=(1, 2))
    U = concept_basis(prompts)
    before = float(((x - x.mean(0)) @ U).var(axis=0).sum())
    after_x = HeadAblation(n_heads=2).fit(C, prompts).transform(x, C)
    after = float(((after_x - after_x.mean(0)) @ U).var(axis=0).sum())
    assert after < 0.1 * before


def test_save_load_round_trip_and_load_corrector_dispatch(tmp_path):
    C, prompts = planted(seed=7)
    fitted = HeadAblation(share=0.8).fit(C, prompts)
    path = fitted.save(tmp_path / "heads.npz")
    loaded = load_corrector(path)
    assert isinstance(loaded, HeadAblation) and loaded.get_params() == {"n_heads": None, "share": 0.8}
    np.testing.assert_array_equal(loaded.heads_, fitted.heads_)
    x = C.sum(axis=(1, 2))
    np.testing.assert_allclose(loaded.transform(x, C), fitted.transform(x, C))
    schur = SchurCorrector().fit(np.random.default_rng(0).normal(size=(10, 6)),
                                 np.random.default_rng(1).normal(size=(10, 6)))
    assert isinstance(load_corrector(schur.save(tmp_path / "schur.npz")), SchurCorrector)
    with pytest.raises(InputError, match="not a saved SchurCorrector"):
        SchurCorrector.load(path)
    import json

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["means"] = arrays["means"][:, :3]  # a file whose arrays disagree
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match="arrays disagree in shape"):
        HeadAblation.load(tmp_path / "bad.npz")
    assert json.loads(str(arrays["meta"]))["format"] == "sce_correct.HeadAblation"
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "x"}'))
    with pytest.raises(InputError, match="not a saved correction"):
        load_corrector(tmp_path / "other.npz")


@pytest.mark.parametrize("params, match", [
    ({"n_heads": 2, "share": 0.5}, "not both"),
    ({"n_heads": 0}, "from 1 to 12"),
    ({"n_heads": 13}, "from 1 to 12"),
    ({"n_heads": 2.0}, "whole number"),
    ({"share": 0.0}, r"\(0, 1\]"),
    ({"share": 1.5}, r"\(0, 1\]"),
])
def test_bad_parameters_are_named(params, match):
    C, prompts = planted()
    with pytest.raises(InputError, match=match):
        HeadAblation(**params).fit(C, prompts)


def test_bad_inputs_are_named():
    C, prompts = planted()
    with pytest.raises(InputError, match="do not differ"):
        HeadAblation().fit(C, np.repeat(prompts[:1], 3, axis=0))
    with pytest.raises(InputError, match=r"\(images, layers, heads, dim\)"):
        HeadAblation().fit(C[:, 0], prompts)
    with pytest.raises(InputError, match="16-d|-d"):
        HeadAblation().fit(C, prompts[:, :8])
    with pytest.raises(InputError, match="not fitted"):
        HeadAblation().transform(C.sum(axis=(1, 2)), C)
    fitted = HeadAblation(n_heads=1).fit(C, prompts)
    with pytest.raises(InputError, match="expected embeddings"):
        fitted.transform(C.sum(axis=(1, 2)), C[:, :2])
