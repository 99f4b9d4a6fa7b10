"""Corrections end to end on small real files: fit, query-side vs re-indexed search, A/B, bad input."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image, write_csv

from indexing.collection import Collection
from indexing.correction_store import list_corrections, load_correction
from indexing.pipeline import build_collection
from retrieval.compare import compare, overlap_at_k, rank_changes, summarize
from retrieval.concepts import load_concept_set
from retrieval.corrections import fit_concept_correction, unit
from retrieval.reindex import reindex
from retrieval.search import Retriever


@pytest.fixture
def collection_dir(tmp_path: Path, toy_encoder: ToyEncoder) -> Path:
    images = tmp_path / "imgs"
    rows = []
    for i in range(40):
        make_image(images / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}", "tone": "dark" if i % 2 else ""})
    listing = tmp_path / "list.csv"
    write_csv(listing, rows, ["file", "caption", "tone"])
    build_collection(listing, tmp_path / "coll", encoder=toy_encoder, progress=False)
    # A concept set: 3 prompts x 4 images each.
    concept = tmp_path / "concept.csv"
    with concept.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "image"])
        for i in range(12):
            w.writerow([f"tone {i % 3}", f"imgs/{i:03d}.png"])
    return tmp_path / "coll"


def _fit(coll, enc, tmp_path, name="c1", **kw):
    return fit_concept_correction(coll, enc, load_concept_set(tmp_path / "concept.csv"), name=name, **kw)


def test_fit_stores_file_row_and_report(collection_dir, toy_encoder, tmp_path):
    with Collection.open(collection_dir) as coll:
        res = _fit(coll, toy_encoder, tmp_path, n_components=2)
        assert res.n_components == 2 and res.info.file.exists()
        assert res.report.n == 12 and 0 < res.report.text_share < 1
        stored = load_correction(coll, "c1")
        assert stored.info.parameters["n_components"] == 2 and stored.info.report["n"] == 12
        with pytest.raises(ValueError, match="already exists"):
            _fit(coll, toy_encoder, tmp_path)
        assert [c.name for c in list_corrections(coll)] == ["c1"]


def test_query_side_and_reindexed_rank_the_same(collection_dir, toy_encoder, tmp_path):
    with Collection.open(collection_dir) as coll:
        _fit(coll, toy_encoder, tmp_path, n_components=2)  # 3 prompts, centred: 2 directions
        r = Retriever(coll, toy_encoder)
        queries = [r.embed_text(f"query {i}") for i in range(5)] + [r.embed_image(tmp_path / "imgs/005.png")]
        before = [[h.item_id for h in r.search(q, 10, correction="c1", strategy="query").hits] for q in queries]
        version = reindex(coll, "c1", progress=False)
        assert version.count == 40 and version.correction == "c1"
        for q, ids_q in zip(queries, before):
            res = r.search(q, 10, correction="c1", strategy="reindexed")
            assert res.strategy == "reindexed"
            assert [h.item_id for h in res.hits] == ids_q
        # And both equal a brute-force ranking of (P x) . q over the stored originals.
        P = r.correction("c1").projection
        ids, raw = next(coll.embeddings.iter_chunks("image"))
        scores = (unit(raw) @ P.T) @ queries[0]
        assert list(ids[np.argsort(-scores)[:10]]) == before[0]
        # auto now picks the re-indexed version
        assert r.search(queries[0], 5, correction="c1").strategy == "reindexed"


def test_reindex_resumes_after_failure(collection_dir, toy_encoder, tmp_path, monkeypatch):
    import retrieval.reindex as rx

    with Collection.open(collection_dir) as coll:
        _fit(coll, toy_encoder, tmp_path, n_components=2)
        real_apply, calls = rx._apply, {"n": 0}

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("killed")
            return real_apply(*args)

        monkeypatch.setattr(rx, "_apply", flaky)
        with pytest.raises(RuntimeError):
            reindex(coll, "c1", chunk_size=10, checkpoint_every=10, progress=False)
        assert coll.current_version("image", "c1") is None  # nothing half-built was published
        monkeypatch.setattr(rx, "_apply", real_apply)
        version = reindex(coll, "c1", chunk_size=10, checkpoint_every=10, progress=False)
        _, index = coll.open_index(version.name)
        assert sorted(index.ids().tolist()) == sorted(coll.embeddings.ids("image").tolist())


def test_ab_comparison(collection_dir, toy_encoder, tmp_path):
    with Collection.open(collection_dir) as coll:
        _fit(coll, toy_encoder, tmp_path, n_components=2)
        r = Retriever(coll, toy_encoder)
        cmp = compare(r, r.embed_text("hello"), "hello", "c1", k=8, attribute="tone")
        ids_a = [h.item_id for h in cmp.original]
        ids_b = [h.item_id for h in cmp.corrected]
        assert cmp.overlap_at_k == pytest.approx(len(set(ids_a) & set(ids_b)) / 8)
        # Concept strength: mean share of each hit's original embedding on the concept directions.
        U = r.correction("c1").concept_basis
        x = unit(coll.embeddings.get("image", ids_b))
        assert cmp.concept_strength_corrected == pytest.approx(np.mean(np.sum((x @ U) ** 2, axis=1)))
        assert 0 < cmp.concept_strength_original < 1
        assert cmp.attribute_share_original is not None
        s = summarize([cmp, cmp])
        assert s.n_queries == 2 and s.mean_overlap_at_k == pytest.approx(cmp.overlap_at_k)
        neg = r.search(r.embed_text("hello"), 5, correction="c1", strategy="negative")
        assert neg.strategy == "negative" and len(neg.hits) == 5


def test_overlap_and_rank_changes():
    assert overlap_at_k([1, 2, 3, 4], [4, 3, 9, 8], 4) == 0.5
    changes = {c.item_id: c for c in rank_changes([1, 2, 3], [3, 1, 7])}
    assert changes[3].moved == 2 and changes[1].moved == -1
    assert changes[2].rank_corrected is None and changes[7].rank_original is None


def test_bad_input_changes_nothing(collection_dir, toy_encoder, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,image\nred,imgs/000.png\n,imgs/001.png\n")
    with pytest.raises(ValueError, match="line 3.*don't pair up"):
        load_concept_set(bad)
    few = tmp_path / "few.csv"
    few.write_text("prompt,image\nred,imgs/000.png\nblue,imgs/001.png\n")
    with pytest.raises(ValueError, match="at least 4"):
        load_concept_set(few)
    missing = tmp_path / "missing.csv"
    missing.write_text("prompt,image\n" + "".join(f"p{i},imgs/nope{i}.png\n" for i in range(5)))
    with pytest.raises(ValueError, match="image not found"):
        load_concept_set(missing)
    with Collection.open(collection_dir) as coll:
        with pytest.raises(ValueError, match="encoder"):
            _fit(coll, ToyEncoder(dim=8), tmp_path)
        with pytest.raises(ValueError, match="n_components"):
            _fit(coll, toy_encoder, tmp_path, n_components=99)
        assert list_corrections(coll) == []
        assert not list((collection_dir / "corrections").glob("*.npz")) if (collection_dir / "corrections").exists() else True
        r = Retriever(coll, toy_encoder)
        with pytest.raises(KeyError, match="no correction named"):
            r.search(r.embed_text("x"), 3, correction="nope")


# -- nprobe reaches the searched index, for every strategy ------------------------------------
NLIST = 8


@pytest.fixture(scope="module")
def ivf_collection(tmp_path_factory) -> Path:
    """300 images in an IVF8 collection, a fitted correction and its IVF8 re-indexed version."""
    tmp = tmp_path_factory.mktemp("ivf")
    encoder = ToyEncoder()
    for i in range(300):
        make_image(tmp / "imgs" / f"{i:03d}.png", seed=1000 + i, size=(8, 8))
    build_collection(tmp / "imgs", tmp / "coll", encoder=encoder, factory=f"IVF{NLIST},Flat", progress=False)
    concept = tmp / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},{tmp}/imgs/{i:03d}.png\n" for i in range(12)))
    with Collection.open(tmp / "coll") as coll:
        fit_concept_correction(coll, encoder, load_concept_set(concept), name="c1", n_components=2)
        reindex(coll, "c1", factory=f"IVF{NLIST},Flat", progress=False)
    return tmp / "coll"


def _exact(coll, scores_of) -> list[int]:
    ids, raw = next(coll.embeddings.iter_chunks("image", chunk_size=10_000))
    return ids[np.argsort(-scores_of(unit(raw)))[:10]].tolist()


@pytest.mark.parametrize("strategy", ["original", "query", "negative", "reindexed", "ab", "retriever-default"])
def test_nprobe_reaches_the_index_for_every_strategy(ivf_collection, strategy):
    """With nprobe = nlist an IVF-Flat search is exhaustive (the brute-force top 10); with
    nprobe = 1 it visits one list and misses some of them. Both must show in every strategy."""
    queries = unit(np.random.default_rng(7).standard_normal((20, 16)))
    with Collection.open(ivf_collection) as coll:
        assert coll.current_version("image").factory == f"IVF{NLIST},Flat"
        assert coll.current_version("image", "c1").factory == f"IVF{NLIST},Flat"
        r = Retriever(coll, ToyEncoder())
        view = r.correction("c1")
        P, concept = view.projection, view.concept_vector

        def ids(q, nprobe):
            if strategy == "original":
                return [h.item_id for h in r.search(q, 10, nprobe=nprobe).hits]
            if strategy in ("query", "negative", "reindexed"):
                result = r.search(q, 10, correction="c1", strategy=strategy, nprobe=nprobe)
                assert result.strategy == strategy
                return [h.item_id for h in result.hits]
            if strategy == "ab":
                return [h.item_id for h in compare(r, q, "q", "c1", k=10, strategy="query", nprobe=nprobe).corrected]
            own = Retriever(coll, ToyEncoder(), nprobe=nprobe)  # the retriever's default reaches the A/B too
            cmp = compare(own, q, "q", "c1", k=10, strategy="reindexed")
            return [h.item_id for h in cmp.original] + [h.item_id for h in cmp.corrected]

        def exact(q):
            original = _exact(coll, lambda x: x @ q)
            corrected = _exact(coll, lambda x: x @ (P @ q))
            negative = _exact(coll, lambda x: x @ (q - concept))
            return {"original": original, "query": corrected, "reindexed": corrected, "negative": negative,
                    "ab": corrected, "retriever-default": original + corrected}[strategy]

        missed = 0
        for q in queries:
            assert ids(q, NLIST) == exact(q)
            missed += ids(q, 1) != exact(q)
        assert missed > 0  # nprobe=1 is not exhaustive here: the setting reached the index


def test_k_and_nprobe_out_of_range(collection_dir, toy_encoder):
    from sce_correct import InputError

    with Collection.open(collection_dir) as coll:
        r = Retriever(coll, toy_encoder)
        q = r.embed_text("x")
        assert len(r.search(q, 10**18).hits) == 40  # capped at the index size, nothing huge allocated
        for bad in (0, -1, 2.5, float("nan"), float("inf")):
            with pytest.raises(InputError, match="k must be"):
                r.search(q, bad)
            with pytest.raises(InputError, match="nprobe must be"):
                r.search(q, 5, nprobe=bad)
        with pytest.raises(InputError, match="nprobe must be"):
            Retriever(coll, toy_encoder, nprobe=0)
        with pytest.raises(InputError, match="NaN"):
            r.search(np.full(16, np.nan), 5)
