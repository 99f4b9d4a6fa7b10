"""Corrections on the sample corpus with the default encoder, end to end (issues 5 and 8).

A sub-collection of the emoji corpus (the people & body emoji that come in five tones plus
their default yellow versions) is indexed once per module with the real default encoder.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import write_csv

from indexing.collection import Collection
from indexing.correction_store import load_correction
from indexing.pipeline import build_collection
from retrieval.concepts import load_concept_set, text_pairs
from retrieval.corrections import fit_concept_correction
from retrieval.reindex import reindex
from retrieval.search import Retriever

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")

pytestmark = pytest.mark.skipif(not (SAMPLE / "captions.csv").exists(), reason="sample corpus missing")


class CachingEncoder:
    """The default encoder, remembering image embeddings by path: each test fits several
    corrections from the same concept set, and encoding its images once keeps the module fast."""

    def __init__(self, encoder):
        self._encoder = encoder
        self._cache: dict[str, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_images(self, images, **kwargs):
        keys = [str(p) for p in images]
        todo = [k for k in dict.fromkeys(keys) if k not in self._cache]
        if todo:
            for k, v in zip(todo, self._encoder.encode_images(todo, **kwargs)):
                self._cache[k] = v
        return np.stack([self._cache[k] for k in keys])


@pytest.fixture(scope="module")
def sample_collection(tmp_path_factory):
    pytest.importorskip("indexing.encoders")
    import indexing

    rows = list(csv.DictReader((SAMPLE / "captions.csv").open(encoding="utf-8")))
    # 30 objects that have all five single-tone variants, plus their default versions.
    toned = {}
    for r in rows:
        if r["skin_tone"] in TONES:
            toned.setdefault(r["object"], []).append(r)
    objects = sorted(o for o, v in toned.items() if len(v) == 5)[::7][:30]
    keep = [r for r in rows if r["object"] in objects and (r["skin_tone"] in TONES or not r["skin_tone"])]
    tmp = tmp_path_factory.mktemp("sample")
    listing = tmp / "list.csv"
    write_csv(listing, keep)
    encoder = CachingEncoder(indexing.load_encoder("default"))
    build_collection(listing, tmp / "coll", encoder=encoder, image_root=SAMPLE, progress=False)
    return tmp / "coll", encoder, objects


def _tone_share(hits, tone: str) -> float:
    return float(np.mean([(h.caption or "").endswith(f", {tone} skin tone") for h in hits]))


def _object_share(hits, obj: str) -> float:
    return float(np.mean([(h.metadata or {}).get("object") == obj for h in hits]))


@pytest.mark.parametrize("direction", ["t2i", "i2t", "t2t"])
def test_nullify_lowers_and_focus_raises_the_tone_share(sample_collection, direction):
    root, encoder, objects = sample_collection
    with Collection.open(root) as coll:
        if direction == "t2t":
            concept = text_pairs([f"{t} skin tone" for t in TONES] * 4,
                                 [f"{o}, {t} skin tone" for o in objects[:4] for t in TONES], name="tones")
        else:
            concept = load_concept_set(ROOT / "data/concepts/skin_tone.csv")
        kind = "image" if direction == "t2i" else "caption"
        for mode in ("nullify", "focus"):
            fit_concept_correction(coll, encoder, concept, name=f"{direction}-{mode}", direction=direction,
                                   mode=mode, n_components=4)
        r = Retriever(coll, encoder)
        k = 10
        shares = {"original": [], "nullify": [], "focus": []}
        objects_kept = {"original": [], "nullify": []}
        for obj in objects[:12]:
            q = r.embed_text(f"{obj}, dark skin tone")
            for name, corr in (("original", None), ("nullify", f"{direction}-nullify"), ("focus", f"{direction}-focus")):
                hits = r.search(q, k, kind=kind, correction=corr, strategy="query" if corr else "auto").hits
                shares[name].append(_tone_share(hits, "dark"))
                if name in objects_kept:
                    objects_kept[name].append(_object_share(hits, obj))
        mean = {k_: float(np.mean(v)) for k_, v in shares.items()}
        print(direction, mean, np.mean(objects_kept["original"]), np.mean(objects_kept["nullify"]))
        assert mean["nullify"] < mean["original"] <= mean["focus"], mean
        # Nullifying the tone keeps the object: the results hold at least as many of its variants.
        assert np.mean(objects_kept["nullify"]) >= np.mean(objects_kept["original"]) - 0.05


def test_reindexed_equals_query_side_on_the_sample(sample_collection):
    root, encoder, objects = sample_collection
    with Collection.open(root) as coll:
        fit_concept_correction(coll, encoder, load_concept_set(ROOT / "data/concepts/skin_tone.csv"),
                               name="no-tone", n_components=4)
        r = Retriever(coll, encoder)
        queries = [r.embed_text(f"{o}") for o in objects[:5]]
        before = [[h.item_id for h in r.search(q, 10, correction="no-tone", strategy="query").hits] for q in queries]
        reindex(coll, "no-tone", progress=False)
        after = [[h.item_id for h in r.search(q, 10, correction="no-tone", strategy="reindexed").hits] for q in queries]
        assert before == after


def test_centred_projection_equalises_tone_means_and_keeps_objects(sample_collection, tmp_path):
    """Fitted on the sub-collection's own tone images (tone-only prompts, stored embeddings
    reused): the centred projection makes the five tones' mean embeddings equal on those
    images, and object-name searches find the object at least as often as before."""
    root, encoder, objects = sample_collection
    with Collection.open(root) as coll:
        ids = coll.embeddings.ids("image")
        records = coll.items(ids)
        tone_of = {i: (records[i].metadata or {}).get("skin_tone") for i in ids.tolist()}
        toned_ids = [i for i in ids.tolist() if tone_of[i] in TONES]
        concept_csv = tmp_path / "tones.csv"
        with concept_csv.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["prompt", "image"])
            w.writerows([f"{tone_of[i]} skin tone", records[i].uri] for i in toned_ids)
        result = fit_concept_correction(coll, encoder, load_concept_set(concept_csv), name="tones-centred")
        assert result.images_reused == len(toned_ids) == 150 and result.images_encoded == 0
        assert result.n_components == 4  # five distinct prompts: rank 4 once centred

        P = load_correction(coll, "tones-centred").corrector.projection(n_components=result.n_components)
        X = coll.embeddings.get("image", np.array(toned_ids))
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        labels = np.array([tone_of[i] for i in toned_ids])

        def spread(E):
            means = np.array([E[labels == t].mean(axis=0) for t in TONES])
            return float(np.abs(means - means.mean(axis=0)).max())

        assert spread(X) > 0.05  # the tones differ before
        assert spread(X @ P) < 1e-5 * spread(X)

        r = Retriever(coll, encoder)

        def found(correction):
            hits = 0
            for obj in objects:
                res = r.search(r.embed_text(obj), 10, correction=correction, strategy="query" if correction else "auto")
                hits += any((records[h.item_id].metadata or {}).get("object") == obj for h in res.hits)
            return hits / len(objects)

        assert found("tones-centred") >= found(None) - 0.05
