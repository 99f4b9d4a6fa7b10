"""How well a correction removes a concept, measured the way concept-erasure work does.

On a built collection (default: the demo collection over the sample corpus) and a concept
set (default: data/concepts/skin_tone_large.csv):

- probe: accuracy of a linear probe (multinomial logistic regression, 5-fold, grouped by
  object so no emoji is in both train and test folds) predicting the concept label (the
  skin tone) from the image embeddings, before and after each method; chance = the
  majority-class share;
- object retrieval: text -> image R@10 of the object's name ("waving hand"), where any
  tone of that object counts as a hit, before and after;
- the concept at search time: for "<object>, dark skin tone" (each toned object; `--value`),
  the share of the top 10 images that have that tone, before and after, and how much of the
  original's excess over a tone-blind ranking is gone. A ranking blind to tone still shows
  some dark items (the object's dark variant among its five tones, and other objects' dark
  ones): the reference row replaces each toned item by its object's mean, which no correction
  can beat without preferring the other tones.

Issue 15's approaches (`benchmarks/concept_approaches.py`) are rows of their own: iterative
removal, context pairs from the collection's metadata centred by object, a Gaussian-kernel
correction mapped back to d dimensions, a neighbour mean after the projection, the nearest
fitted object's tone span, and a kernel regression of each image's offset from its object's
mean (the concept images grouped by object, items without a tone as anchors; and from the
concept file alone: each image's nearest image of every other prompt as its object, the items
least in the projection's null space as anchors). The caption index gets the same measures for I2T and T2T
corrections (held-out objects).

Methods: the original embeddings; the Schur projection (nullify, fitted on the concept set,
centred as `sce correct fit` does by default, and uncentred; query-side and re-indexed rankings
are identical); the negative-query baseline
q - a * concept; LEACE (PyPI concept-erasure) fitted on the same concept-set images with
their tone labels, the reference for linear erasure. When the collection's encoder has a ViT
image tower (`--encoder emoji-vit` collections), also the head correction of
`sce correct fit --method heads` (the heads holding a share of the concept variance over the
concept images mean-ablated, means over 500 collection images: every image is decomposed once)
at each `--heads-share`, and heads then the Schur projection (fitted on the head-ablated
concept images).

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
from sce_correct.corrector import DEFAULT_ENERGY

import concept_approaches as ca  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
OFFSET_ANCHORS = 1500  # collection items the label-free offset regression keeps in place


def probe_accuracy(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score

    clf = LogisticRegression(max_iter=2000, C=10.0)
    return float(np.mean(cross_val_score(clf, X, y, groups=groups, cv=GroupKFold(n_splits=5))))


def recall_at_k(query_vecs, item_vecs, item_objects, query_objects, k=10) -> float:
    scores = query_vecs @ item_vecs.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return float(np.mean([query_objects[i] in set(item_objects[top[i]]) for i in range(len(query_vecs))]))


def schur_projection(text_emb, image_emb, *, components, energy, center=True):
    """(P, k) of the nullify projection fitted on these pairs."""
    P = SchurCorrector(center=center).fit(text_emb, image_emb).projection(
        n_components=components, energy=None if components else energy)
    return P, int(round(np.trace(np.eye(text_emb.shape[1]) - P)))


def head_methods(heads, fit_rows, text_emb, *, shares, components, energy) -> dict:
    """The head corrections (and heads + Schur) fitted on the concept rows ``fit_rows``."""
    from sce_correct import HeadAblation

    out = {}
    for share in shares:
        ablation = HeadAblation(share=share).fit(heads["concept_terms"][fit_rows], text_emb,
                                                 reference_means=heads["reference_means"])
        items = unit(ablation.transform(heads["item_total"], heads["item_terms"]))
        ablated_concept = unit(ablation.transform(heads["concept_total"][fit_rows], heads["concept_terms"][fit_rows]))
        P, k = schur_projection(text_emb, ablated_concept, components=components, energy=energy)
        label = f"heads (share {share:g}: {len(ablation.heads_)} heads)"
        out[label] = (lambda v, items=items: items, lambda q: q)
        out[f"{label} + schur (k={k})"] = (lambda v, items=items, P=P: items @ P, lambda q: q)
    return out


def fit_methods(text_emb, image_emb, prompts, *, components, energy, negative_weight, heads=None,
                fit_rows=None, shares=(), context=None, concept_groups=None, anchors=None, collection_rows=None):
    """name -> (item transform, query transform) for every method, fitted on these pairs.

    The item transforms take the collection's embedding matrix (the head corrections ignore it
    and use the collection's decomposition in ``heads``). ``anchors``: embeddings of items
    without the concept, which the kernel offset regression keeps in place; ``collection_rows``:
    (the collection rows of the concept images fitted on, the number of rows), for the
    label-free offset regression, whose anchors are other rows."""
    import torch
    from concept_erasure import LeaceEraser

    projections, ks = {}, {}
    for center in (True, False):
        projections[center], ks[center] = schur_projection(text_emb, image_emb, components=components,
                                                           energy=energy, center=center)
    concept_vec = unit(unit(text_emb).mean(axis=0))
    tones = sorted(set(prompts))
    z = np.eye(len(tones))[[tones.index(p) for p in prompts]]
    eraser = LeaceEraser.fit(torch.from_numpy(unit(image_emb)).double(), torch.from_numpy(z).double())
    leace = lambda v: eraser(torch.from_numpy(v).double()).numpy()  # noqa: E731
    same = lambda v: v  # noqa: E731
    methods = {
        "original": (same, same),
        f"schur projection (centred, k={ks[True]})": (lambda v: v @ projections[True], same),
        f"schur projection (uncentred, k={ks[False]})": (lambda v: v @ projections[False], same),
        f"negative query (a={negative_weight})": (same, lambda q: q - negative_weight * concept_vec),
        "LEACE (concept-erasure)": (leace, leace),
    }
    P_iter, rounds = ca.iterative_projection(text_emb, image_emb, energy=energy or DEFAULT_ENERGY)
    methods[f"iterative removal ({rounds} round(s), k={int(round(np.trace(np.eye(len(P_iter)) - P_iter)))})"] = (
        lambda v: v @ P_iter.T, same)
    if context is not None:  # pairs from the collection: each toned item's caption with its image
        captions, images, groups, items = context
        for k in (8, 16):
            P_ctx = ca.context_projection(captions[items], images[items], groups[items], k)
            methods[f"t2i in context (metadata, by object), k={k}"] = (lambda v, P=P_ctx: v @ P, same)
            if k == 8:
                methods["t2i in context k=8 + neighbour mean (0.85, 8)"] = (
                    lambda v, P=P_ctx: ca.knn_smooth(v @ P), same)
    methods["gaussian kernel (RFF 1000), k=4, mapped back"] = (
        lambda v: ca.kernel_projection_map_back(text_emb, image_emb, v, 4), same)
    if concept_groups is not None:  # the object of each concept row
        P = projections[True]
        methods[f"schur k={ks[True]} + nearest object's tone span (rank 2)"] = (
            lambda v: ca.local_projection(v @ P, image_emb @ P, concept_groups), same)
        if anchors is not None:
            methods[f"schur k={ks[True]} + kernel offset regression (by object)"] = (
                lambda v: ca.offset_regression(image_emb @ P, ca.group_offsets(image_emb @ P, concept_groups),
                                               anchors @ P, v @ P), same)
    if collection_rows is not None:  # label-free: partners from the prompts, the weakest-concept items as anchors
        P = projections[True]
        candidates = np.setdiff1d(np.arange(collection_rows[1]), collection_rows[0])
        methods[f"schur k={ks[True]} + kernel offset regression (concept file only)"] = (
            lambda v: ca.offset_regression(
                image_emb @ P, ca.partner_offsets(image_emb @ P, np.asarray(prompts)),
                v[ca.weakest_concept_rows(v, P, candidates, OFFSET_ANCHORS)] @ P, v @ P), same)
    methods[f"schur k={ks[True]} + neighbour mean (cos >= 0.85, 8)"] = (
        lambda v: ca.knn_smooth(v @ projections[True]), same)
    if heads is not None:
        rows = np.ones(len(text_emb), dtype=bool) if fit_rows is None else fit_rows
        methods.update(head_methods(heads, rows, text_emb, shares=shares, components=components, energy=energy))
    return methods


def caption_methods(text_emb, image_emb, concept_rows, CAP, X, objects, fit_items, energy) -> dict:
    """name -> caption-space projection P (applied to the caption index and to the query) for
    I2T and T2T, fitted on the concept rows (and, for the context pairs, the collection's items)."""
    energy = energy or DEFAULT_ENERGY
    out = {"original": np.eye(CAP.shape[1])}
    i2t = SchurCorrector(direction="i2t", center=True).fit(image_emb, text_emb)
    k = i2t.n_components_for_energy(energy)
    out[f"i2t: concept images -> tone prompts (k={k})"] = i2t.projection(n_components=k)
    has_item = concept_rows >= 0
    t2t = SchurCorrector(direction="t2t", center=True).fit(text_emb[has_item], CAP[concept_rows[has_item]])
    k = t2t.n_components_for_energy(energy)
    out[f"t2t: tone prompts -> captions (k={k})"] = t2t.projection(n_components=k)
    for k in (8, 16):
        out[f"i2t in context (metadata, by object), k={k}"] = ca.context_projection(
            X[fit_items], CAP[fit_items], objects[fit_items], k)
    return out


def print_tone_variance(heads, text_emb) -> None:
    """Where the concept lives: variance along the prompts' differences, per term of the concept images."""
    from sce_correct.heads import concept_basis

    U = concept_basis(text_emb)

    def along(x):
        x = x - x.mean(axis=0)
        return float(((x @ U) ** 2).sum(axis=-1).mean())

    terms = heads["concept_terms"]
    print(f"concept variance of the concept images' embeddings along the prompts' differences: "
          f"{along(heads['concept_total']):.1f}")
    print(f"  all heads summed {along(terms.sum(axis=(1, 2))):.1f}; MLPs summed {along(heads['concept_mlps'].sum(axis=1)):.1f}; "
          f"stem {along(heads['concept_stem']):.1f}")
    print("  MLP by layer " + " ".join(f"{along(heads['concept_mlps'][:, l]):.1f}" for l in range(terms.shape[1])))
    for layer in range(terms.shape[1]):
        print(f"  heads of layer {layer}: " + " ".join(f"{along(terms[:, layer, h]):.2f}" for h in range(terms.shape[2])))


def decompose_collection(encoder, coll, ids, concept_images, reference_images=500, seed=0):
    """The head terms and totals of every item and every concept image, and the reference means."""
    from retrieval.head_correction import reference_means
    from retrieval.heads import decompose_images

    records = coll.items(ids)
    items = decompose_images(encoder, [records[int(i)].uri for i in ids], what="collection image")
    d = decompose_images(encoder, concept_images, what="concept image")
    means, _ = reference_means(encoder, coll, reference_images, seed)
    return {"item_terms": items.head_terms().astype(np.float32), "item_total": items.total(),
            "concept_terms": d.head_terms(), "concept_total": d.total(), "concept_mlps": d.mlps,
            "concept_stem": d.stem, "reference_means": means}


def value_share(query_vecs, item_vecs, item_labels, value: str, k: int = 10) -> float:
    """Mean share of each query's top-k items whose label is ``value`` (e.g. "dark")."""
    scores = query_vecs @ item_vecs.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return float(np.mean(item_labels[top] == value))


def evaluate(methods, X, labels, objects, probe_mask, queries, value_queries=None, value="dark"):
    """Probe accuracy on X[probe_mask], R@10 for each query set and, for ``value_queries``
    ("<object>, dark skin tone"), the share of the top 10 with that ``value``, per method."""
    out = {}
    for name, (items_fn, query_fn) in methods.items():
        items = items_fn(X)
        row = {"probe_accuracy": probe_accuracy(items[probe_mask], labels[probe_mask], objects[probe_mask])}
        for label, (q, q_objects) in queries.items():
            row[label] = recall_at_k(unit(query_fn(q)), items, objects, np.array(q_objects))
        if value_queries is not None:
            row[f"{value}_share10"] = value_share(unit(query_fn(value_queries)), items, labels, value)
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
    ap.add_argument("--value", default="dark", help="the concept value of the '<object>, VALUE skin tone' queries")
    ap.add_argument("--heads-share", default="0.5,0.8,0.95",
                    help="shares of the concept variance for the head corrections (ViT encoders only)")
    args = ap.parse_args()

    concept = load_concept_set(args.concept)
    with Collection.open(args.collection) as coll:
        encoder = coll.load_encoder()
        ids = coll.embeddings.ids("image")
        records = coll.items(ids)
        X = unit(coll.embeddings.get("image", ids))
        CAP = unit(coll.embeddings.get("caption", ids))  # every sample item has a caption
        embedded = embed_images(encoder, concept.images, coll)  # stored vectors where the file is an item
        heads = decompose_collection(encoder, coll, ids, concept.images) if hasattr(encoder, "visual") else None
    shares = [float(x) for x in args.heads_share.split(",") if x.strip()] if heads is not None else []
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
    concept_item_rows = np.array([-1 if r is None else r for r in rows])  # -1: the file is not an item

    toned = np.array([bool(lab) and "," not in lab for lab in labels])  # single-tone items
    toned_objects = sorted(set(objects[toned]))
    all_objects = sorted(set(objects))
    q_toned = encoder.encode_texts(toned_objects)
    tone_query = "{object}, " + args.value + " skin tone"
    q_toned_value = encoder.encode_texts([tone_query.format(object=o) for o in toned_objects])
    q_all = encoder.encode_texts(all_objects)
    fit_kw = dict(components=args.components, energy=args.energy, negative_weight=args.negative_weight,
                  heads=heads, shares=shares)
    floor_name = "reference: tone-blind (object means)"

    def chance(mask):
        return max(np.mean(labels[mask] == t) for t in set(labels[mask]))

    # In-sample: fitted on the whole concept set.
    anchors = X[labels == ""]  # items without a tone, for the kernel offset regression
    methods = fit_methods(text_emb, image_emb, concept.prompts, context=(CAP, X, objects, toned),
                          concept_groups=concept_objects, anchors=anchors,
                          collection_rows=(concept_item_rows[concept_item_rows >= 0], len(X)), **fit_kw)
    methods[floor_name] = (lambda v: ca.group_means(v, objects, toned), lambda q: q)
    corrected = unit(methods[next(n for n in methods if n.startswith("schur projection (centred"))][0](X))
    near = np.argsort(-(corrected[toned] @ corrected.T), axis=1)[:, 1:5]
    same_object = float(np.mean(objects[near] == objects[toned][:, None]))
    in_sample = evaluate(methods, X, labels, objects, toned,
                         {"recall10_toned_objects": (q_toned, toned_objects),
                          "recall10_all_objects": (q_all, all_objects)}, q_toned_value, args.value)
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
        q_half_value = encoder.encode_texts([tone_query.format(object=o) for o in half_objects])
        fit_items = toned & ~np.isin(objects, list(half))
        m = fit_methods(text_emb[fit_rows], image_emb[fit_rows], prompts[fit_rows].tolist(), fit_rows=fit_rows,
                        context=(CAP, X, objects, fit_items), concept_groups=concept_objects[fit_rows],
                        anchors=anchors, collection_rows=(concept_item_rows[fit_rows & (concept_item_rows >= 0)], len(X)),
                        **fit_kw)
        m[floor_name] = (lambda v: ca.group_means(v, objects, toned), lambda q: q)
        held_out.append(evaluate(m, X, labels, objects, probe_mask,
                                 {"recall10_toned_objects": (q_half, half_objects),
                                  "recall10_all_objects": (q_all, all_objects)}, q_half_value, args.value))
        chances.append(chance(probe_mask))
    # The caption index (I2T and T2T corrections), held-out objects only.
    caption_halves = []
    for half in halves:
        half = set(half.tolist())
        fit_rows = np.array([o not in half for o in concept_objects])
        fit_items = toned & ~np.isin(objects, list(half))
        probe_mask = toned & np.isin(objects, list(half))
        half_objects = sorted(half)
        q_half = unit(encoder.encode_texts(half_objects))
        q_value = unit(encoder.encode_texts([tone_query.format(object=o) for o in half_objects]))
        projections_c = caption_methods(text_emb[fit_rows], image_emb[fit_rows], concept_item_rows[fit_rows], CAP, X,
                                        objects, fit_items, args.energy)
        table = {}
        for name, P in projections_c.items():
            Z = CAP @ P.T
            table[name] = {
                "probe_accuracy": probe_accuracy(Z[probe_mask], labels[probe_mask], objects[probe_mask]),
                "recall10_toned_objects": recall_at_k(unit(q_half @ P.T), Z, objects, np.array(half_objects)),
                "recall10_all_objects": recall_at_k(unit(unit(q_all) @ P.T), Z, objects, np.array(all_objects)),
                f"{args.value}_share10": value_share(unit(q_value @ P.T), Z, labels, args.value)}
        floor = ca.group_means(CAP, objects, toned)
        table[floor_name] = {
            "probe_accuracy": probe_accuracy(floor[probe_mask], labels[probe_mask], objects[probe_mask]),
            "recall10_toned_objects": recall_at_k(q_half, floor, objects, np.array(half_objects)),
            "recall10_all_objects": recall_at_k(unit(q_all), floor, objects, np.array(all_objects)),
            f"{args.value}_share10": value_share(q_value, floor, labels, args.value)}
        caption_halves.append(table)
    caption_mean = {name: {key: float(np.mean([list(h.values())[row][key] for h in caption_halves]))
                           for key in caption_halves[0][name]}
                    for row, name in enumerate(caption_halves[0])}
    # Rows by position: the projection sizes in the names may differ between the halves.
    held_out_mean = {name: {key: float(np.mean([list(h.values())[row][key] for h in held_out]))
                            for key in held_out[0][name]}
                     for row, name in enumerate(held_out[0])}

    print(f"after the centred projection, {same_object:.1%} of each toned image's 4 nearest images are "
          "other tones of its object (what the neighbour mean averages)")
    if heads is not None:
        print_tone_variance(heads, text_emb)
    print(f"collection {args.collection}: {len(ids)} images, {toned.sum()} with one {args.label_field}, "
          f"{len(toned_objects)} toned objects; concept set {concept.source.name}: {len(concept)} pairs "
          f"({embedded.reused} from stored embeddings)")
    share_key = f"{args.value}_share10"
    header = (f"{'method':<52}{'probe acc':>10}{'R@10 toned objects':>20}{'R@10 all objects':>18}"
              f"{args.value + ' share@10':>16}{'excess gone':>13}")
    sections = [
        (f"in-sample (fitted on all {len(concept)} pairs; chance {chance(toned):.3f})", in_sample),
        (f"held-out objects (2 halves; fitted on {[int(len(concept) - np.isin(concept_objects, list(h)).sum()) for h in halves]} "
         f"pairs; chance {np.mean(chances):.3f}; k as in the first half)", held_out_mean),
        ("caption index, held-out objects (probe and hits on the caption embeddings; the query "
         "corrected by the same projection)", caption_mean),
    ]
    for title, table in sections:
        # "excess gone": the share of the original's excess over the tone-blind reference that a
        # method removes, (original - method) / (original - reference); 1 = as tone-blind as it gets.
        top, bottom = table["original"][share_key], table[floor_name][share_key]
        for row in table.values():
            row[f"{args.value}_excess_gone"] = (top - row[share_key]) / (top - bottom) if top > bottom else float("nan")
        print(f"\n{title}\n{header}")
        for name, row in table.items():
            print(f"{name[:51]:<52}{row['probe_accuracy']:>10.3f}{row['recall10_toned_objects']:>20.3f}"
                  f"{row['recall10_all_objects']:>18.3f}{row[share_key]:>16.3f}{row[share_key.replace('share10', 'excess_gone')]:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "concept": str(concept.source),
            "chance": {"in_sample": chance(toned), "held_out": float(np.mean(chances))},
            "in_sample": in_sample, "held_out_objects": held_out_mean, "captions_held_out_objects": caption_mean},
            indent=2))


if __name__ == "__main__":
    main()
