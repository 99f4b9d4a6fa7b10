"""All three directions in the product: the caption index, I2T and T2T corrections."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image, write_csv

from indexing.captions import embed_captions
from indexing.collection import Collection
from indexing.pipeline import build_collection
from retrieval.compare import compare
from retrieval.concepts import load_concept_set, text_pairs
from retrieval.corrections import fit_concept_correction, unit
from retrieval.reindex import reindex
from retrieval.search import Retriever


@pytest.fixture
def toy_collection(tmp_path: Path, toy_encoder: ToyEncoder) -> Path:
    rows = []
    for i in range(30):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": "" if i % 10 == 9 else f"thing {i} tone {i % 3}"})
    listing = tmp_path / "list.csv"
    write_csv(listing, rows, ["file", "caption"])
    build_collection(listing, tmp_path / "coll", encoder=toy_encoder, progress=False)
    with (tmp_path / "concept.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "image"])
        for i in range(12):
            w.writerow([f"tone {i % 3}", f"imgs/{i:03d}.png"])
    return tmp_path / "coll"


def test_caption_index_has_the_captioned_items_with_the_same_ids(toy_collection, toy_encoder):
    with Collection.open(toy_collection) as coll:
        ids, records = coll.item_ids(), None
        records = coll.items(ids)
        captioned = sorted(i for i, r in records.items() if r.caption)
        assert len(captioned) == 27  # three items have no caption
        assert coll.embeddings.ids("caption").tolist() == captioned
        _, index = coll.open_index(kind="caption")
        assert sorted(index.ids().tolist()) == captioned
        stored = coll.embeddings.get("caption", captioned[:3])
        expected = toy_encoder.encode_texts([records[i].caption for i in captioned[:3]])
        np.testing.assert_allclose(stored, expected, rtol=1e-6)
        # Re-running encodes nothing new; deleting an item removes its caption vector too.
        assert embed_captions(coll, toy_encoder).count == 27
        coll.delete(ids=[captioned[0]])
        assert captioned[0] not in coll.embeddings.ids("caption").tolist()
        _, index = coll.open_index(kind="caption")
        assert captioned[0] not in index.ids().tolist()


def test_four_search_modes(toy_collection, toy_encoder, tmp_path):
    with Collection.open(toy_collection) as coll:
        r = Retriever(coll, toy_encoder)
        q_text, q_img = r.embed_text("thing 4 tone 1"), r.embed_image(tmp_path / "imgs/004.png")
        for q, kind in ((q_text, "image"), (q_img, "image"), (q_text, "caption"), (q_img, "caption")):
            hits = r.search(q, 5, kind=kind).hits
            assert len(hits) == 5
        assert r.search(q_text, 1, kind="caption").hits[0].caption == "thing 4 tone 1"  # exact text
        assert r.search(q_img, 1, kind="image").hits[0].uri.endswith("004.png")


@pytest.mark.parametrize("direction", ["i2t", "t2t"])
def test_caption_corrections_query_side_equals_reindexed(toy_collection, toy_encoder, tmp_path, direction):
    with Collection.open(toy_collection) as coll:
        if direction == "i2t":
            concept = load_concept_set(tmp_path / "concept.csv")
        else:
            concept = text_pairs([f"tone {i % 3}" for i in range(12)], [f"thing {i} tone {i % 3}" for i in range(12)])
        res = fit_concept_correction(coll, toy_encoder, concept, name=f"c-{direction}", direction=direction,
                                     n_components=2)
        assert res.info.target_kind == "caption"
        r = Retriever(coll, toy_encoder)
        q = r.embed_text("thing 7 tone 1")
        with pytest.raises(ValueError, match="applies to the caption index"):
            r.search(q, 5, kind="image", correction=f"c-{direction}")
        before = [h.item_id for h in r.search(q, 8, kind="caption", correction=f"c-{direction}", strategy="query").hits]
        reindex(coll, f"c-{direction}", progress=False)
        after = [h.item_id for h in r.search(q, 8, kind="caption", correction=f"c-{direction}", strategy="reindexed").hits]
        assert before == after
        cmp = compare(r, q, "q", f"c-{direction}", k=8, kind="caption")
        assert cmp.strategy == "reindexed" and len(cmp.corrected) == 8


def test_i2t_paired_reindex_uses_each_items_image(toy_collection, toy_encoder, tmp_path):
    with Collection.open(toy_collection) as coll:
        fit_concept_correction(coll, toy_encoder, load_concept_set(tmp_path / "concept.csv"), name="p",
                               direction="i2t")
        version = reindex(coll, "p", variant="paired", progress=False)
        assert version.kind == "caption" and version.count == 27
        stored = __import__("indexing.correction_store", fromlist=["x"]).load_correction(coll, "p").corrector
        ids = coll.embeddings.ids("caption")[:4]
        expected = unit(stored.correct(coll.embeddings.get("image", ids), unit(coll.embeddings.get("caption", ids))))
        _, index = coll.open_index(version.name)
        got = np.vstack([index.index.reconstruct(int(i)) for i in ids])
        np.testing.assert_allclose(got, expected, atol=1e-5)
