"""How well a correction removes a concept, measured the way concept-erasure work does.

On a built collection (default: the demo collection over the sample corpus) and a concept
set (default: data/concepts/skin_tone.csv):

- probe: accuracy of a linear probe (multinomial logistic regression, 5-fold, grouped by
  object so no emoji is in both train and test folds) predicting the concept label (the
  skin tone) from the image embeddings, before and after each method; chance = the
  majority-class share;
- object retrieval: text -> image R@10 of the object's name ("waving hand"), where any
  tone of that object counts as a hit, before and after.

Methods: the original embeddings; the Schur projection (nullify, fitted on the concept set;
query-side and re-indexed rankings are identical); the negative-query baseline
q - a * concept; LEACE (PyPI concept-erasure) fitted on the same concept-set images with
their tone labels, the reference for linear erasure.

Run: .venv/bin/python benchmarks/eval_concept_removal.py [--collection demo-collection]
(after `make demo` or `sce demo --no-serve` built it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import indexing
from indexing.collection import Collection
from retrieval.concepts import load_concept_set
from retrieval.corrections import encode_concept_set, unit
from sce_correct import SchurCorrector

ROOT = Path(__file__).resolve().parents[1]


def probe_accuracy(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score

    clf = LogisticRegression(max_iter=2000, C=10.0)
    return float(np.mean(cross_val_score(clf, X, y, groups=groups, cv=GroupKFold(n_splits=5))))


def recall_at_k(query_vecs, item_vecs, item_objects, query_objects, k=10) -> float:
    scores = query_vecs @ item_vecs.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([query_objects[i] in set(item_objects[top[i]]) for i in range(len(query_vecs))]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", default="demo-collection")
    ap.add_argument("--concept", default=str(ROOT / "data/concepts/skin_tone.csv"))
    ap.add_argument("--label-field", default="skin_tone")
    ap.add_argument("--energy", type=float, default=0.95)
    ap.add_argument("--components", type=int, default=None)
    ap.add_argument("--negative-weight", type=float, default=1.0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    with Collection.open(args.collection) as coll:
        encoder = indexing.load_encoder(coll.encoder_name)
        ids = coll.embeddings.ids("image")
        records = coll.items(ids)
        X = unit(coll.embeddings.get("image", ids))
    meta = [records[i].metadata or {} for i in ids.tolist()]
    objects = np.array([m.get("object") or records[i].caption for m, i in zip(meta, ids.tolist())])
    labels = np.array([m.get(args.label_field) or "" for m in meta])

    concept = load_concept_set(args.concept)
    text_emb, image_emb = encode_concept_set(encoder, concept, "t2i")
    corr = SchurCorrector().fit(text_emb, image_emb)
    P = corr.projection(n_components=args.components, energy=None if args.components else args.energy)
    k = int(round(np.trace(np.eye(P.shape[0]) - P)))
    concept_vec = unit(unit(text_emb).mean(axis=0))

    # LEACE on the same concept-set images, with the tone labels the prompts name.
    import torch
    from concept_erasure import LeaceEraser

    tones = sorted(set(concept.prompts))
    z = np.eye(len(tones))[[tones.index(p) for p in concept.prompts]]
    eraser = LeaceEraser.fit(torch.from_numpy(unit(image_emb)).double(), torch.from_numpy(z).double())
    leace = lambda v: eraser(torch.from_numpy(v).double()).numpy()

    # Probe on single-tone items (labels without a comma).
    toned = np.array([bool(lab) and "," not in lab for lab in labels])
    majority = max(np.mean(labels[toned] == t) for t in set(labels[toned]))
    # Object retrieval: every object that has tone variants, queried by its name.
    toned_objects = sorted(set(objects[toned]))
    queries = unit(encoder.encode_texts(toned_objects))
    all_objects = sorted(set(objects))
    queries_all = unit(encoder.encode_texts(all_objects))

    methods = {
        "original": (X, queries, queries_all),
        f"schur projection (nullify, k={k})": (X @ P, queries, queries_all),
        f"negative query (a={args.negative_weight})": (
            X, queries - args.negative_weight * concept_vec, queries_all - args.negative_weight * concept_vec),
        "LEACE (concept-erasure)": (leace(X), leace(queries), leace(queries_all)),
    }
    rows = []
    print(f"collection {args.collection}: {len(ids)} images, {toned.sum()} with one {args.label_field}; "
          f"concept set {concept.source.name}: {len(concept)} pairs; chance (majority) {majority:.3f}")
    print(f"{'method':<38}{'probe acc':>10}{'R@10 toned objects':>20}{'R@10 all objects':>18}")
    for name, (items, q_toned, q_all) in methods.items():
        acc = probe_accuracy(items[toned], labels[toned], objects[toned])
        r_toned = recall_at_k(unit(q_toned), items, objects, np.array(toned_objects))
        r_all = recall_at_k(unit(q_all), items, objects, np.array(all_objects))
        rows.append({"method": name, "probe_accuracy": acc, "recall10_toned_objects": r_toned,
                     "recall10_all_objects": r_all})
        print(f"{name:<38}{acc:>10.3f}{r_toned:>20.3f}{r_all:>18.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"chance": majority, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
