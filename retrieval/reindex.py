"""Batch re-index: a new index version of a collection with a correction applied.

Reads the stored original embeddings in chunks (never the images), applies the correction
and writes a new index version that is published atomically when complete; searches keep
using the previous version meanwhile. A killed job resumes where its last checkpoint left off.

Variants:
- "projection" (cosine corrections): x -> P x for unit-norm x, stored without renormalising,
  so inner-product scores equal those of the query-side correction (P q) . x.
- "paired": x -> phi(x) - s * Gamma' phi(source), with each item's own caption as the source
  (t2i; images for i2t/t2t on captions), then renormalised. Items without a paired source are
  stored uncorrected.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from indexing.collection import Collection, IndexVersionInfo
from indexing.correction_store import load_correction
from indexing.vector_index import unit_rows
from retrieval.corrections import unit

logger = logging.getLogger(__name__)

VARIANTS = ("auto", "projection", "paired")
SOURCE_KIND = {"t2i": "caption", "i2t": "image", "t2t": "caption"}


def _paired_source_kind(direction: str) -> str:
    if direction == "t2t":
        raise ValueError("a t2t correction has no per-item paired source: re-index it with the projection variant")
    return SOURCE_KIND[direction]


def reindex(collection: Collection, correction: str, *, variant: str = "auto", chunk_size: int = 65536,
            factory: str | None = None, progress: bool = True, checkpoint_every: int = 200_000) -> IndexVersionInfo:
    """Build (or resume) the corrected index version for `correction`; returns it once published."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    stored = load_correction(collection, correction)
    corrector, info = stored.corrector, stored.info
    kind = info.target_kind
    if variant == "auto":
        variant = "projection" if corrector.kernel == "cosine" else "paired"
    if variant == "projection" and corrector.kernel != "cosine":
        raise ValueError(f"correction {correction!r} uses the {corrector.kernel} kernel: only the paired variant applies")
    total = collection.embeddings.count(kind)
    if total == 0:
        raise ValueError(f"the collection has no stored {kind} embeddings to re-index")
    if variant == "projection":
        P = corrector.projection(n_components=info.parameters.get("n_components"),
                                 mode=info.parameters.get("mode", "nullify")).astype(np.float32)
        dim = P.shape[0]
        source_kind, source_ids = None, None
    else:
        P = None
        source_kind = _paired_source_kind(info.direction)
        source_ids = collection.embeddings.ids(source_kind)  # once per job, not per chunk
        if not len(source_ids):
            raise ValueError(f"the paired variant needs stored {source_kind} embeddings; this collection has none")
        dim = corrector.feature_map_.n_output_features_
    apply_args = (collection, corrector, P, source_kind, source_ids)
    parameters = {"variant": variant, "correction_parameters": {k: v for k, v in info.parameters.items()
                                                                if k != "concept_vector"}}
    with collection.new_index_version(kind=kind, correction=correction, factory=factory, dim=dim,
                                      parameters=parameters, checkpoint_every=checkpoint_every) as writer:
        done = writer.done_ids
        bar = tqdm(total=total, desc=f"re-index {correction}", unit="vec", disable=not progress, initial=len(done))
        trained = not writer.needs_training
        for ids, raw in collection.embeddings.iter_chunks(kind, chunk_size=chunk_size):
            if len(done):
                keep = ~np.isin(ids, done)
                ids, raw = ids[keep], raw[keep]
            if not len(ids):
                continue
            vectors = _apply(*apply_args, ids, raw)
            if not trained:
                sample_ids, sample_raw = collection.embeddings.sample(kind, 50_000)
                writer.train(_apply(*apply_args, sample_ids, sample_raw))
                trained = True
            writer.add(ids, vectors, check_new=False, normalize=(variant != "projection"))
            bar.update(len(ids))
        bar.close()
        version = writer.version
    logger.info("published index version %s for correction %s", version.name, correction)
    return collection.version(version.name)


def _apply(collection, corrector, P, source_kind, source_ids, ids, raw) -> np.ndarray:
    """Corrected vectors for one chunk: P x (projection, P given) or the paired correction."""
    x = unit_rows(raw)  # float32 throughout: this is the hot loop
    if P is not None:
        return x @ P.T
    has_source = np.isin(ids, source_ids)
    out = corrector.feature_map_.transform(x)
    if has_source.any():
        src = collection.embeddings.get(source_kind, ids[has_source])
        out[has_source] = corrector.correct(src, x[has_source])
    return unit(out).astype(np.float32)
