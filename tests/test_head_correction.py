"""Head corrections end to end (`sce correct fit --method heads`, re-index, search, export) with
the shipped emoji-vit on a slice of the sample corpus: 16 toned emoji in their five tones plus
40 others. Independent computations: the decomposition of every image by
``indexing.encoders.decomposition.decompose`` directly, the concept variance of each head as
``tr(P Cov P)`` with ``P`` the least-squares projector onto the prompts' differences, and the
ablated embeddings summed by hand."""
from __future__ import annotations

import csv
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")
from typer.testing import CliRunner  # noqa: E402

from conftest import write_csv  # noqa: E402
from ui.cli import app  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
N_TONED_OBJECTS, N_OTHERS, K = 16, 40, 4
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A built emoji-vit collection of the slice, its concept set, and the encoder."""
    import indexing

    root = tmp_path_factory.mktemp("heads")
    rows = list(csv.DictReader(open(SAMPLE / "captions.csv", encoding="utf-8")))
    by_object: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["skin_tone"] in TONES:
            by_object.setdefault(row["object"], {})[row["skin_tone"]] = row
    toned = [o for o in sorted(by_object) if len(by_object[o]) == 5][:N_TONED_OBJECTS]
    others = [r for r in rows if not r["skin_tone"]][:N_OTHERS]
    chosen = [by_object[o][t] for o in toned for t in TONES] + others
    listing = write_csv(root / "slice.csv", [{"image": str(SAMPLE / r["file"]), "caption": r["caption"],
                                              "skin_tone": r["skin_tone"]} for r in chosen])
    concept = write_csv(root / "tone.csv", [{"prompt": f"{t} skin tone", "image": str(SAMPLE / by_object[o][t]["file"])}
                                            for o in toned for t in TONES])
    coll = root / "coll"
    result = invoke("index", "build", listing, "-c", coll, "--encoder", "emoji-vit", "-q")
    assert result.exit_code == 0, result.output
    return {"root": root, "coll": coll, "concept": concept, "encoder": indexing.load_encoder("emoji-vit"),
            "toned": toned}


def decomposition_of(encoder, paths):
    from indexing.encoders.decomposition import decompose

    return decompose(encoder.visual, encoder.preprocess_batch([str(p) for p in paths]))


def item_paths(coll):
    from indexing.collection import Collection

    with Collection.open(coll) as opened:
        ids = opened.embeddings.ids("image")
        records = opened.items(ids)
    return ids, [records[int(i)].uri for i in ids]


@pytest.fixture(scope="module")
def fitted(corpus):
    result = invoke("correct", "fit", "-c", corpus["coll"], "--name", "tone-heads", "--method", "heads",
                    "--heads", K, "--concept", corpus["concept"], "-q")
    assert result.exit_code == 0, result.output
    import shutil

    shutil.copytree(corpus["coll"], corpus["root"] / "fitted-copy")
    return result.output


def stored_ablation(coll, name="tone-heads"):
    from indexing.collection import Collection
    from indexing.correction_store import load_correction

    with Collection.open(coll) as opened:
        return load_correction(opened, name)


def test_fit_stores_the_heads_with_most_concept_variance_and_their_collection_means(corpus, fitted):
    from sce_correct import HeadAblation

    stored = stored_ablation(corpus["coll"])
    ablation = stored.corrector
    assert isinstance(ablation, HeadAblation) and stored.info.direction == "t2i" and stored.info.kernel == "heads"
    assert stored.info.parameters["heads"] == ablation.head_names and len(ablation.heads_) == K
    assert ", ".join(ablation.head_names) in fitted
    concept_rows = list(csv.DictReader(open(corpus["concept"], encoding="utf-8")))
    terms = decomposition_of(corpus["encoder"], [r["image"] for r in concept_rows]).head_terms()
    prompts = corpus["encoder"].encode_texts([r["prompt"] for r in concept_rows]).astype(np.float64)
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    D = (prompts[1:] - prompts[0]).T
    P = D @ np.linalg.pinv(D, rcond=1e-6)
    variance = np.array([[np.trace(P @ np.cov(terms[:, l, h].T, bias=True) @ P) for h in range(terms.shape[2])]
                         for l in range(terms.shape[1])])
    top = np.argsort(-variance, axis=None)[:K]
    assert [tuple(x) for x in ablation.heads_.tolist()] == [tuple(np.unravel_index(i, variance.shape)) for i in top]
    # Means over the whole collection (it has fewer items than the 500 sampled by default).
    _, paths = item_paths(corpus["coll"])
    means = decomposition_of(corpus["encoder"], paths).head_terms().mean(axis=0)
    np.testing.assert_allclose(ablation.means_, means[ablation.heads_[:, 0], ablation.heads_[:, 1]],
                               rtol=1e-4, atol=1e-6)
    listed = invoke("correct", "list", "-c", corpus["coll"])
    assert "heads=" + ",".join(ablation.head_names) in listed.output


def brute_corrected(corpus, paths, *, coll=None, name="tone-heads"):
    """unit(sum of the terms with the stored correction's heads replaced by their means)."""
    ablation = stored_ablation(coll or corpus["coll"], name).corrector
    d = decomposition_of(corpus["encoder"], paths)
    x = d.total()
    for (layer, head), mean in zip(ablation.heads_, ablation.means_):
        x = x - d.head_terms()[:, layer, head] + mean
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_searching_needs_the_reindexed_version_then_matches_a_brute_force_ranking(corpus, fitted, tmp_path):
    before = invoke("search", "-c", corpus["coll"], "--ab", "tone-heads", "waving hand, dark skin tone")
    assert before.exit_code == 1
    assert "re-index first: sce index reindex --correction tone-heads" in before.output
    assert "Traceback" not in before.output
    done = invoke("index", "reindex", "-c", corpus["coll"], "--correction", "tone-heads", "-q")
    assert done.exit_code == 0, done.output
    ids, paths = item_paths(corpus["coll"])
    expected = brute_corrected(corpus, paths)
    query = "thumbs up sign, dark skin tone"
    q = corpus["encoder"].encode_texts([query])[0].astype(np.float64)
    q /= np.linalg.norm(q)
    scores = expected @ q
    order = np.argsort(-scores)[:8]
    result = invoke("search", "-c", corpus["coll"], "--ab", "tone-heads", query, "-k", 8, "--json")
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["strategy"] == "reindexed"
    hits = line["corrected"]
    assert [h["id"] for h in hits] == ids[order].tolist()
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=2e-4)
    # The web UI's A/B search takes the same re-indexed version.
    from ui.app_state import AppState
    from ui.tab_search import SearchActions

    state = AppState(corpus["coll"], encoder=corpus["encoder"])
    label = dict((name, text) for text, name in state.correction_choices())["tone-heads"]
    assert label == "tone-heads (mean-ablated heads, image index, re-indexed)"
    row = next(r for r in state.correction_rows() if r[0] == "tone-heads")
    assert row[4] == "mean-ablated heads" and row[5] == ",".join(stored_ablation(corpus["coll"]).corrector.head_names)
    summary, _, corrected, _ = SearchActions(state).search(query, None, "tone-heads", "auto", 1.0, 8, "image", "")
    assert "re-indexed version" in summary
    assert [int(re.search(r"\bid (\d+)\b", item[1]).group(1)) for item in corrected] == ids[order].tolist()


def test_an_item_whose_file_is_gone_keeps_its_stored_embedding(corpus, tmp_path, caplog):
    import shutil

    from indexing.collection import Collection
    from retrieval.embedding_export import held_vectors

    folder = tmp_path / "images"
    folder.mkdir()
    rows = list(csv.DictReader(open(corpus["concept"], encoding="utf-8")))[:10]
    for row in rows:
        shutil.copy(row["image"], folder / Path(row["image"]).name)
    coll = tmp_path / "coll"
    assert invoke("index", "build", folder, "-c", coll, "--encoder", "emoji-vit", "-q").exit_code == 0
    fit = invoke("correct", "fit", "-c", coll, "--name", "h2", "--method", "heads", "--heads", 2,
                 "--concept", corpus["concept"], "-q")
    assert fit.exit_code == 0, fit.output
    ids, paths = item_paths(coll)
    gone = 3
    expected = brute_corrected(corpus, paths, coll=coll, name="h2")
    Path(paths[gone]).unlink()
    result = invoke("index", "reindex", "-c", coll, "--correction", "h2")
    assert result.exit_code == 0, result.output
    assert "1 item(s) kept their original embedding" in caplog.text
    with Collection.open(coll) as opened:
        version = opened.current_version("image", "h2")
        _, index = opened.open_index(version)
        held = held_vectors(index.index, ids)
        stored = opened.embeddings.get("image", ids)
    expected[gone] = stored[gone] / np.linalg.norm(stored[gone])
    np.testing.assert_allclose(held, expected, atol=2e-4)
    changed = np.abs(held - stored / np.linalg.norm(stored, axis=1, keepdims=True)).max(axis=1)
    assert changed[gone] < 1e-6 and (np.delete(changed, gone) > 1e-3).all()


def test_export_without_a_reindex_computes_the_ablated_embeddings(corpus, fitted, tmp_path):
    import pyarrow.parquet as pq

    copy = corpus["root"] / "fitted-copy"  # copied right after the fit: no re-indexed version
    out = tmp_path / "out"
    result = invoke("index", "export", out, "-c", copy, "--correction", "tone-heads", "-q")
    assert result.exit_code == 0, result.output
    vectors = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("img_emb_*.npy"))])
    meta = pq.read_table(sorted((out / "metadata").glob("*.parquet"))[0]).to_pydict()
    ids, paths = item_paths(copy)
    position = {int(i): n for n, i in enumerate(ids)}
    np.testing.assert_allclose(vectors, brute_corrected(corpus, [paths[position[i]] for i in meta["id"]]),
                               atol=2e-4)


def test_top_ranked_heads_remove_more_of_the_concept_than_the_lowest_ranked(corpus, fitted):
    """Ablating the K heads with most concept variance lowers the embeddings' variance along the
    concept's directions more than ablating the K with least: the ranking means something."""
    ablation = stored_ablation(corpus["coll"]).corrector
    concept_rows = list(csv.DictReader(open(corpus["concept"], encoding="utf-8")))
    d = decomposition_of(corpus["encoder"], [r["image"] for r in concept_rows])
    U = ablation.concept_basis_
    order = np.argsort(-ablation.concept_variance_, axis=None)
    lowest = np.stack(np.unravel_index(order[-K:], ablation.concept_variance_.shape), axis=1)

    def concept_variance_after(heads):
        x = d.total().copy()
        for layer, head in heads:
            term = d.head_terms()[:, layer, head]
            x = x - term + term.mean(axis=0)
        return float((((x - x.mean(0)) @ U) ** 2).sum(axis=1).mean())

    top, low, none = (concept_variance_after(ablation.heads_), concept_variance_after(lowest),
                      concept_variance_after([]))
    assert top < 0.85 * none and top < low


def test_the_plan_pickles_without_its_encoder(corpus, fitted):
    """Ray actors get the plan pickled; each loads the encoder itself."""
    from indexing.collection import Collection
    from retrieval.head_correction import HeadReencoder
    from retrieval.reindex import corrected_vectors, plan_reindex

    with Collection.open(corpus["coll"]) as opened:
        plan = plan_reindex(opened, "tone-heads")
        assert plan.variant == "heads" and isinstance(plan.corrector, HeadReencoder)
        ids = opened.embeddings.ids("image")[:5]
        first = corrected_vectors(opened, plan, ids, opened.embeddings.get("image", ids))
        assert plan.corrector.encoder is not None
        copy = pickle.loads(pickle.dumps(plan))
        assert copy.corrector.encoder is None
        np.testing.assert_allclose(corrected_vectors(opened, copy, ids, opened.embeddings.get("image", ids)), first,
                                   atol=1e-6)
        with pytest.raises(Exception, match="only the heads variant"):
            plan_reindex(opened, "tone-heads", variant="projection")
        # the caller's loaded encoder (the web UI's) is the one used, not a second copy
        given = plan_reindex(opened, "tone-heads", encoder=corpus["encoder"])
        assert given.corrector.encoder is corpus["encoder"]
        np.testing.assert_allclose(corrected_vectors(opened, given, ids, opened.embeddings.get("image", ids)), first,
                                   atol=1e-6)
        import indexing

        with pytest.raises(Exception, match="encoder"):  # another encoder than the collection's is refused
            plan_reindex(opened, "tone-heads", encoder=indexing.load_encoder("default"))


@pytest.mark.parametrize("args, message", [
    (["--method", "heads", "--direction", "i2t"], "it is a t2i correction"),
    (["--heads", "2"], "need --method heads"),
    (["--share", "0.5"], "need --method heads"),
    (["--method", "heads", "--share", "1.5"], r"--share must be in \(0, 1\]"),
    (["--method", "heads", "--heads", "2", "--share", "0.5"], "not both"),
    (["--method", "heads", "--components", "2"], "Schur options"),
    (["--method", "nope"], "--method must be schur or heads"),
    (["--method", "heads", "--heads", "17"], "from 1 to 16"),
    (["--method", "heads", "--strength", "0.3"], "Schur options"),
    (["--method", "heads", "--no-center"], "Schur options"),
    (["--reference-images", "50"], "need --method heads"),
])
def test_bad_head_options_are_one_line(corpus, args, message):
    result = invoke("correct", "fit", "-c", corpus["coll"], "--name", "bad", "--concept", corpus["concept"], *args, "-q")
    assert result.exit_code == 1, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert "bad" not in invoke("correct", "list", "-c", corpus["coll"]).output.split()


def test_a_collection_without_a_vit_is_refused(tmp_path, toy_encoder, image_folder):
    from indexing.collection import Collection
    from indexing.pipeline import build_collection
    from retrieval.concepts import load_concept_set
    from retrieval.head_correction import fit_head_correction
    from sce_correct.errors import InputError

    images = sorted(image_folder.glob("*.png"))
    concept = write_csv(tmp_path / "c.csv", [{"prompt": f"shade {i % 2}", "image": str(p)} for i, p in enumerate(images)])
    build_collection(image_folder, tmp_path / "coll", encoder=toy_encoder, progress=False)
    with Collection.open(tmp_path / "coll") as opened:
        with pytest.raises(InputError, match="exposes no ViT image tower"):
            fit_head_correction(opened, toy_encoder, load_concept_set(concept), name="h")
        assert opened.corrections.names() == []


def test_decompose_images_in_chunks_equals_one_pass_and_names_an_unreadable_file(corpus, tmp_path):
    from retrieval.heads import decompose_images
    from sce_correct.errors import InputError

    _, paths = item_paths(corpus["coll"])
    paths = paths[:37]
    chunked = decompose_images(corpus["encoder"], paths, chunk=16)  # 16 + 16 + 5
    whole = decomposition_of(corpus["encoder"], paths)
    assert chunked.heads.shape == whole.heads.shape
    for name in ("heads", "mlps", "stem"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-6, atol=1e-8)
    seen = []
    decompose_images(corpus["encoder"], paths, chunk=16, progress=lambda f, text: seen.append(round(f, 3)))
    assert seen == [0.0, round(16 / 37, 3), round(32 / 37, 3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"concept image .*broken\.png cannot be read"):
        decompose_images(corpus["encoder"], paths[:20] + [str(broken)], what="concept image", chunk=16)
