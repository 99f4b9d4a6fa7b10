"""Head corrections: remove a concept by mean-ablating the ViT heads that carry it (issue 14).

``sce correct fit --method heads`` decomposes the concept set's images
(:func:`retrieval.heads.decompose_images`), ranks the heads by their variance along the concept
prompts' differences (:class:`sce_correct.HeadAblation`) and takes each head's mean term over a
seeded sample of the collection's images as what an ablated head writes instead. It is stored
like any correction (``corrections/<name>.npz`` plus its row, direction t2i: it changes image
embeddings), and applied by re-encoding: an image's corrected embedding is the sum of its
decomposition's terms with the chosen heads replaced by their means, normalised.

A text query is not changed (the heads are in the image tower), so a head correction has no
query-side form: searching with it needs its re-indexed version (``sce index reindex``), which
:class:`HeadReencoder` computes chunk by chunk from the items' image files. An item whose file
cannot be read any more (or that has none, e.g. imported embeddings) keeps its stored original
embedding; the re-index counts and logs them.
"""
from __future__ import annotations

import logging

import numpy as np

from indexing.collection import Collection
from indexing.correction_store import check_correction_name, save_correction
from indexing.encoders.encoder import encode_texts_once
from indexing.vector_index import unit_rows
from retrieval.concepts import ConceptSet
from retrieval.corrections import FitResult, unit
from retrieval.heads import DEFAULT_IMAGES, DEFAULT_SEED, decompose_images, decompose_paths, sample_items, vit_of
from sce_correct import HeadAblation, sce_score
from sce_correct.heads import DEFAULT_SHARE
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

DECODE_BATCH = 64


def reference_means(encoder, collection: Collection, images: int = DEFAULT_IMAGES,
                    seed: int = DEFAULT_SEED) -> tuple[np.ndarray, int]:
    """Each head's mean term over a seeded sample of the collection's images, and how many were read."""
    sample = sample_items(collection, images, seed)
    total, count = None, 0
    for start in range(0, len(sample.paths), DECODE_BATCH):
        decomposition, positions = decompose_paths(encoder, sample.paths[start:start + DECODE_BATCH])
        if decomposition is None:
            continue
        heads = decomposition.head_terms()
        total = heads.sum(axis=0) if total is None else total + heads.sum(axis=0)
        count += len(positions)
    if count < 2:
        raise InputError(f"only {count} of the {len(sample.paths)} sampled collection images could be read; "
                         "the heads' mean terms need at least 2")
    return total / count, count


def fit_head_correction(collection: Collection, encoder, concept: ConceptSet, *, name: str,
                        n_heads: int | None = None, share: float | None = None,
                        reference_images: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED,
                        replace: bool = False) -> FitResult:
    """Fit a head correction on a prompt/image concept set and store it under ``name``.

    ``n_heads`` or ``share`` chooses how many heads (see :class:`sce_correct.HeadAblation`);
    the means come from ``reference_images`` collection images sampled with ``seed``.
    Nothing is written when any step fails.
    """
    check_correction_name(name)
    collection.check_encoder(encoder.name, encoder.dim)
    vit_of(encoder)  # a clear line for a CNN encoder before any decoding
    if concept.images is None:
        raise InputError(f"a head correction needs prompt/image pairs; {concept.source} pairs texts")
    decomposition = decompose_images(encoder, concept.images, what="concept image")
    _, n_layers, n_heads_in, _ = decomposition.head_terms().shape
    HeadAblation(n_heads=n_heads, share=share).check_params(n_layers, n_heads_in)  # before the sample's pass
    texts = encode_texts_once(encoder, concept.prompts)
    means, read = reference_means(encoder, collection, reference_images, seed)
    ablation = HeadAblation(n_heads=n_heads, share=share).fit(decomposition.head_terms(), texts,
                                                              reference_means=means)
    images = decomposition.total()
    report = sce_score(texts, images)
    parameters = {
        "method": "heads", "heads": ablation.head_names, "n_heads": n_heads,
        "share": share if share is not None or n_heads is not None else DEFAULT_SHARE,  # what chose the heads
        "explained_share": ablation.explained_share_, "reference_images": read, "seed": seed,
        "n_pairs": len(concept), "distinct_prompts": len(set(concept.prompts)),
        "concept_vector": [round(float(x), 7) for x in unit(unit(texts).mean(axis=0))],
    }
    info = save_correction(collection, name, ablation, encoder=encoder.name, dim=encoder.dim,
                           parameters=parameters, fitted_on=str(concept.source), report=report.to_dict(),
                           replace=replace)
    logger.info("head correction %s: ablates %s (%.1f%% of the concept variance)", name,
                ", ".join(ablation.head_names), 100 * ablation.explained_share_)
    return FitResult(info=info, report=report, n_components=len(ablation.heads_),
                     explained_share=ablation.explained_share_, images_encoded=len(concept.images))


class HeadReencoder:
    """The corrected image embeddings of a head correction, by re-encoding the items' files.

    The encoder (the collection's own) is loaded on the first chunk and not pickled, so a
    re-index plan holding one can be sent to Ray actors, each loading its own.
    """

    def __init__(self, ablation: HeadAblation, encoder=None) -> None:
        self.ablation = ablation
        self.encoder = encoder
        self.uncorrected = 0  # items kept with their stored embedding (no readable file)

    def __getstate__(self) -> dict:
        return {"ablation": self.ablation, "encoder": None, "uncorrected": 0}

    def vectors(self, collection: Collection, ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """Unit-norm float32 corrected embeddings of items ``ids`` (``raw``: their stored ones)."""
        if self.encoder is None:
            self.encoder = collection.load_encoder()
            collection.check_writer(self.encoder)  # the corrected version's vectors are re-encoded
        ids = np.asarray(ids, dtype=np.int64)
        out = unit_rows(raw)
        records = collection.items(ids)
        for start in range(0, len(ids), DECODE_BATCH):
            chunk = ids[start:start + DECODE_BATCH]
            paths = [records[int(i)].uri if int(i) in records else None for i in chunk]
            decomposition, positions = decompose_paths(self.encoder, paths)
            missed = sorted(set(range(len(chunk))) - set(positions))
            if missed:
                self.uncorrected += len(missed)
                logger.warning("%d item(s) keep their original embedding: no readable image file (e.g. %s)",
                               len(missed), paths[missed[0]])
            if decomposition is None:
                continue
            corrected = self.ablation.transform(decomposition.total(), decomposition.head_terms())
            out[start + np.asarray(positions)] = unit_rows(corrected)
        return out
