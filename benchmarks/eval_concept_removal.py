"""How well a correction removes a concept, measured the way concept-erasure work does.

On a built collection (default: the demo collection over the sample corpus) and a concept
set (default: data/concepts/skin_tone_large.csv):

- probe: accuracy of a linear probe (multinomial logistic regression, 5-fold, grouped by
  object so no emoji is in both train and test folds) predicting the concept label (the
  skin tone) from the image embeddings, before and after each method; chance = the
  majority-class share;
- object retrieval: text -> image R@10 of the object's name ("waving hand"), where any
  tone of that object counts as a hit, before and after.

Methods: the original embeddings; the Schur projection (nullify, fitted on the concept set,
centred as `sce correct fit` does by default, and uncentred; query-side and re-indexed rankings
are identical); the negative-query baseline
q - a * concept; LEACE (PyPI concept-erasure) fitted on the same concept-set images with
their tone labels, the reference for linear erasure.

Two protocols:
- in-sample: each method is fitted on the whole concept set and probed on every single-tone
  image of the collection, which includes the concept-set images themselves;
- held-out objects (the honest one): the toned objects are split in two halves; each method is
  fitted on the concept rows of one half and probed on the images of the other half, then the
  halves swap and the figures are averaged. A method that only memorises its fitting images
  does no better here than the original embeddings.

Concept images that are items of the collection take their stored embeddings (no encoding).

Run: .venv/bin/python benchmarks/eval_concept_removal.py [--collection demo-collection]
(after `make demo` or `sce demo --no-serve` built it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from indexing.atomic import file_sha256
from indexing.collection import Collection
from indexing.encoders.encoder import encode_texts_once
from retrieval.concepts import load_concept_set
from retrieval.corrections import embed_images, unit
from sce_correct import SchurCorrector

ROOT = Path(__file__).resolve().parents[1]


def probe_accuracy(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score

    clf = LogisticRegression(max_iter=2000, C=10.0)
    return float(np.mean(cross_val_score(clf, X, y, groups=groups, cv=GroupKFold(n_splits=5))))


def recall_at_k(query_vecs, item_vecs, item_objects, query_objects, k=10) -> float:
    scores = query_vecs @ item_vecs.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return float(np.mean([query_objects[i] in set(item_objects[top[i]]) for i in range(len(query_vecs))]))


def fit_methods(text_emb, image_emb, prompts, *, components, energy, negative_weight):
    """name -> (item transform, query transform) for every method, fitted on these pairs."""
    import torch
    from concept_erasure import LeaceEraser

    projections, ks = {}, {}
    for center in (True, False):
        corr = SchurCorrector(center=center).fit(text_emb, image_emb)
        projections[center] = corr.projection(n_components=components, energy=None if components else energy)
        ks[center] = int(round(np.trace(np.eye(text_emb.shape[1]) - projections[center])))
    concept_vec = unit(unit(text_emb).mean(axis=0))
    tones = sorted(set(prompts))
    z = np.eye(len(tones))[[tones.index(p) for p in prompts]]
    eraser = LeaceEraser.fit(torch.from_numpy(unit(image_emb)).double(), torch.from_numpy(z).double())
    leace = lambda v: eraser(torch.from_numpy(v).double()).numpy()  # noqa: E731
    same = lambda v: v  # noqa: E731
    return {
        "original": (same, same),
        f"schur projection (centred, k={ks[True]})": (lambda v: v @ projections[True], same),
        f"schur projection (uncentred, k={ks[False]})": (lambda v: v @ projections[False], same),
        f"negative query (a={negative_weight})": (same, lambda q: q - negative_weight * concept_vec),
        "LEACE (concept-erasure)": (leace, leace),
    }


def evaluate(methods, X, labels, objects, probe_mask, queries):
    """Probe accuracy on X[probe_mask] and R@10 for each query set, per method."""
    out = {}
    for name, (items_fn, query_fn) in methods.items():
        items = items_fn(X)
        row = {"probe_accuracy": probe_accuracy(items[probe_mask], labels[probe_mask], objects[probe_mask])}
        for label, (q, q_objects) in queries.items():
            row[label] = recall_at_k(unit(query_fn(q)), items, objects, np.array(q_objects))
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", default="demo-collection")
    ap.add_argument("--concept", default=str(ROOT / "data/concepts/skin_tone_large.csv"))
    ap.add_argument("--label-field", default="skin_tone")
    ap.add_argument("--energy", type=float, default=None, help="projection size by energy (default: the library's)")
    ap.add_argument("--components", type=int, default=None)
    ap.add_argument("--negative-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split of objects")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    concept = load_concept_set(args.concept)
    with Collection.open(args.collection) as coll:
        encoder = coll.load_encoder()
        ids = coll.embeddings.ids("image")
        records = coll.items(ids)
        X = unit(coll.embeddings.get("image", ids))
        embedded = embed_images(encoder, concept.images, coll)  # stored vectors where the file is an item
    meta = [records[i].metadata or {} for i in ids.tolist()]
    objects = np.array([m.get("object") or records[i].caption for m, i in zip(meta, ids.tolist())])
    labels = np.array([m.get(args.label_field) or "" for m in meta])
    text_emb = encode_texts_once(encoder, concept.prompts)
    image_emb = unit(embedded.vectors)
    # The object of each concept row (for the held-out split): the object of the item with the
    # same content (as embed_images matches them), else the file.
    row_of_sha = {records[i].sha256: r for r, i in enumerate(ids.tolist())}
    rows = [row_of_sha.get(file_sha256(p)) for p in concept.images]
    concept_objects = np.array([objects[r] if r is not None else str(concept.images[j])
                                for j, r in enumerate(rows)])
    prompts = np.array(concept.prompts)

    toned = np.array([bool(lab) and "," not in lab for lab in labels])  # single-tone items
    toned_objects = sorted(set(objects[toned]))
    all_objects = sorted(set(objects))
    q_toned = encoder.encode_texts(toned_objects)
    q_all = encoder.encode_texts(all_objects)
    fit_kw = dict(components=args.components, energy=args.energy, negative_weight=args.negative_weight)

    def chance(mask):
        return max(np.mean(labels[mask] == t) for t in set(labels[mask]))

    # In-sample: fitted on the whole concept set.
    methods = fit_methods(text_emb, image_emb, concept.prompts, **fit_kw)
    in_sample = evaluate(methods, X, labels, objects, toned,
                         {"recall10_toned_objects": (q_toned, toned_objects),
                          "recall10_all_objects": (q_all, all_objects)})
    # Held-out objects: two halves of the toned objects, fit on one, probe the other.
    rng = np.random.default_rng(args.seed)
    halves = np.array_split(rng.permutation(toned_objects), 2)
    held_out, chances = [], []
    for half in halves:
        half = set(half.tolist())
        fit_rows = np.array([o not in half for o in concept_objects])
        probe_mask = toned & np.isin(objects, list(half))
        half_objects = sorted(half)
        q_half = encoder.encode_texts(half_objects)
        m = fit_methods(text_emb[fit_rows], image_emb[fit_rows], prompts[fit_rows].tolist(), **fit_kw)
        held_out.append(evaluate(m, X, labels, objects, probe_mask,
                                 {"recall10_toned_objects": (q_half, half_objects),
                                  "recall10_all_objects": (q_all, all_objects)}))
        chances.append(chance(probe_mask))
    # Rows by position: the projection sizes in the names may differ between the halves.
    held_out_mean = {name: {key: float(np.mean([list(h.values())[row][key] for h in held_out]))
                            for key in held_out[0][name]}
                     for row, name in enumerate(held_out[0])}

    print(f"collection {args.collection}: {len(ids)} images, {toned.sum()} with one {args.label_field}, "
          f"{len(toned_objects)} toned objects; concept set {concept.source.name}: {len(concept)} pairs "
          f"({embedded.reused} from stored embeddings)")
    header = f"{'method':<38}{'probe acc':>10}{'R@10 toned objects':>20}{'R@10 all objects':>18}"
    sections = [
        (f"in-sample (fitted on all {len(concept)} pairs; chance {chance(toned):.3f})", in_sample),
        (f"held-out objects (2 halves; fitted on {[int(len(concept) - np.isin(concept_objects, list(h)).sum()) for h in halves]} "
         f"pairs; chance {np.mean(chances):.3f}; k as in the first half)", held_out_mean),
    ]
    for title, table in sections:
        print(f"\n{title}\n{header}")
        for name, row in table.items():
            print(f"{name:<38}{row['probe_accuracy']:>10.3f}{row['recall10_toned_objects']:>20.3f}"
                  f"{row['recall10_all_objects']:>18.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "concept": str(concept.source),
            "chance": {"in_sample": chance(toned), "held_out": float(np.mean(chances))},
            "in_sample": in_sample, "held_out_objects": held_out_mean}, indent=2))


if __name__ == "__main__":
    main()
