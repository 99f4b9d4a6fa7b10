"""Fit a concept correction from a preliminary concept set and store it with its SCE report."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexing.atomic import file_sha256
from indexing.catalog import EmbeddingKind
from indexing.collection import Collection
from indexing.correction_store import CorrectionInfo, check_correction_name, save_correction
from indexing.encoders.encoder import encode_texts_once
from indexing.vector_index import unit_rows
from retrieval.concepts import ConceptSet
from sce_correct import SchurCorrector, SCEReport, sce_score
from sce_correct.corrector import DEFAULT_ENERGY
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

MODES = ("nullify", "focus")


@dataclass(frozen=True)
class FitResult:
    info: CorrectionInfo
    report: SCEReport
    n_components: int | None
    explained_share: float | None  # share of tr R that the chosen components hold
    images_reused: int = 0  # concept images whose stored collection embedding was used
    images_encoded: int = 0  # concept images decoded and encoded now


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


@dataclass(frozen=True)
class ImageEmbeddings:
    """Raw image embeddings of a list of files, and how many came from the collection."""

    vectors: np.ndarray  # float32 (n, dim), in input order
    reused: int  # files whose stored embedding was taken
    encoded: int  # files decoded and encoded now


def embed_images(encoder, images: Sequence[str | Path], collection: Collection | None = None, *,
                 progress: bool = False) -> ImageEmbeddings:
    """Raw image embeddings of files, taking the collection's stored vector for files it holds.

    A file is reused when its content (sha256 of its bytes, as the indexing pipeline hashes
    it) is that of a catalog item with a stored image embedding; the path does not matter,
    so a file changed since indexing is encoded again. The stored vectors are the raw
    outputs of the collection's encoder, which the caller must have checked is ``encoder``
    (:meth:`Collection.check_encoder`). Files not reused are encoded, each distinct content
    once. Without a collection everything is encoded.
    """
    images = list(images)
    n = len(images)
    vectors = np.empty((n, encoder.dim), dtype=np.float32)
    reused = np.zeros(n, dtype=bool)
    digests: list[str | None] = [None] * n
    if collection is not None and n:
        for position, path in enumerate(images):
            try:
                digests[position] = file_sha256(path)
            except OSError:  # unreadable now: encoding reports it with the reason
                pass
        known = collection.find_sha256([d for d in digests if d is not None])
        if known:
            item_of = {digest: item_id for digest, (item_id, _uri) in known.items()}
            stored: dict[int, np.ndarray] = {}
            wanted = sorted(set(item_of.values()))
            for ids, chunk in collection.embeddings.iter_chunks(EmbeddingKind.IMAGE, ids=wanted):
                stored.update(zip(ids.tolist(), chunk))  # items without a stored vector are absent
            for position, digest in enumerate(digests):
                vector = stored.get(item_of.get(digest, -1)) if digest is not None else None
                if vector is not None:
                    if vector.shape != (encoder.dim,):
                        raise InputError(f"the collection stores {vector.shape[-1]}-d image embeddings, "
                                         f"encoder {encoder.name!r} gives {encoder.dim}-d ones")
                    vectors[position] = vector
                    reused[position] = True
    # Encode the rest, each distinct content once (a file that could not be hashed on its own).
    first_of: dict[str, int] = {}
    to_encode: list[int] = []
    copies: list[tuple[int, int]] = []
    for position in np.flatnonzero(~reused).tolist():
        digest = digests[position]
        if digest is not None and digest in first_of:
            copies.append((position, first_of[digest]))
            continue
        if digest is not None:
            first_of[digest] = position
        to_encode.append(position)
    if to_encode:
        encoded = np.asarray(encoder.encode_images([images[i] for i in to_encode], progress=progress),
                             dtype=np.float32)
        vectors[to_encode] = encoded
    for position, source in copies:
        vectors[position] = vectors[source]
    return ImageEmbeddings(vectors=vectors, reused=int(reused.sum()), encoded=len(to_encode))


def _encode_pairs(encoder, concept: ConceptSet, direction: str, collection: Collection | None,
                  progress: bool) -> tuple[np.ndarray, np.ndarray, ImageEmbeddings | None]:
    if direction == "t2t":
        if concept.targets is None:
            raise InputError(f"a t2t correction needs text pairs (columns source,target); {concept.source} pairs images")
        return encode_texts_once(encoder, concept.prompts), encode_texts_once(encoder, concept.targets), None
    if concept.images is None:
        raise InputError(f"a {direction} correction needs prompt/image pairs; {concept.source} pairs texts")
    texts = encode_texts_once(encoder, concept.prompts)
    images = embed_images(encoder, concept.images, collection, progress=progress)
    if collection is not None:
        logger.info("%s: %d of %d concept images reused from the collection's stored embeddings, %d encoded",
                    concept.name, images.reused, len(concept.images), images.encoded)
    else:
        logger.info("%s: %d concept images encoded", concept.name, images.encoded)
    pair = (texts, images.vectors) if direction == "t2i" else (images.vectors, texts)
    return (*pair, images)


def encode_concept_set(encoder, concept: ConceptSet, direction: str, *, collection: Collection | None = None,
                       progress: bool = False):
    """(source, target) embeddings for a direction: t2i texts->images, i2t images->texts, t2t texts->texts.

    With ``collection`` (bound to ``encoder``), images it already holds take their stored
    embeddings (see :func:`embed_images`); the others are encoded.
    """
    source, target, _ = _encode_pairs(encoder, concept, direction, collection, progress)
    return source, target


def fit_concept_correction(collection: Collection, encoder, concept: ConceptSet, *, name: str,
                           direction: str = "t2i", kernel: str = "cosine", mode: str = "nullify",
                           n_components: int | None = None, energy: float | None = None,
                           strength: float = 1.0, ridge: float = 1e-4, sigma: float | None = None,
                           rff_dim: int = 2500, seed: int = 0, center: bool = True, replace: bool = False,
                           reuse_stored: bool = True, progress: bool = False) -> FitResult:
    """Encode the concept set with the collection's encoder, fit a SchurCorrector and store it.

    Concept images already in the collection (same file content, by sha256) take their stored
    embeddings instead of being decoded and encoded again; ``reuse_stored=False`` encodes all.

    ``center`` (default on, unlike the bare SchurCorrector) fits on mean-centred features, so
    the correction removes what varies with the prompts (the concept) and keeps what every
    concept image shares: fitted uncentred on skin_tone_large.csv, the no-skin-tone projection
    also removed "hand" and a "waving hand" search returned water waves and flags.

    Both sides are normalised to unit length first: a correction is fitted, and applied, on
    unit-norm embeddings (what the index holds and what queries are), whatever scale the
    encoder's raw outputs have.

    For the cosine kernel the projection size is fixed now (from `n_components` or `energy`)
    and stored with the correction, so every later search and re-index uses the same one.
    Nothing is written when any step fails.
    """
    check_correction_name(name)
    if mode not in MODES:
        raise InputError(f"mode must be 'nullify' or 'focus', got {mode!r}")
    if kernel != "cosine" and (n_components is not None or energy is not None):
        raise InputError("--components and --energy choose a projection, which needs the cosine kernel")
    if n_components is not None and energy is not None:
        raise InputError("give --components or --energy, not both (each sets how many concept directions to remove)")
    collection.check_encoder(encoder.name, encoder.dim)
    source, target, images = _encode_pairs(encoder, concept, direction,
                                           collection if reuse_stored else None, progress)
    # Fitted on unit-norm embeddings, the space the index and the queries live in (a re-index
    # and a search apply the correction to unit rows). The cosine kernel normalises anyway; a
    # Gaussian one's bandwidth and random features are for the scale they were fitted on, and
    # raw encoder outputs (open_clip) are not unit-norm.
    source, target = unit_rows(source), unit_rows(target)
    corrector = SchurCorrector(direction=direction, kernel=kernel, ridge=ridge, strength=strength,
                               sigma=sigma, rff_dim=rff_dim, seed=seed, center=center).fit(source, target)
    k = share = None
    if kernel == "cosine":
        k = int(n_components) if n_components is not None else corrector.n_components_for_energy(
            energy if energy is not None else DEFAULT_ENERGY)
        corrector.projection(n_components=k, mode=mode)  # validates k now, not at search time
        lam = corrector.explained_eigvals_
        share = float(lam[:k].sum() / lam.sum()) if lam.sum() > 0 else 0.0
    report = sce_score(source, target, kernel=kernel, sigma=sigma, rff_dim=rff_dim, ridge=ridge, seed=seed)
    # The concept's own text direction, for the negative-query baseline (q - a * concept).
    prompt_side = source if direction in ("t2i", "t2t") else target
    concept_vec = unit(unit(prompt_side).mean(axis=0))
    parameters = {
        "mode": mode, "n_components": k, "energy": energy, "explained_share": share,
        "strength": strength, "ridge": ridge, "center": center, "sigma": sigma, "rff_dim": rff_dim, "seed": seed,
        "n_pairs": len(concept), "distinct_prompts": len(set(concept.prompts)),
        "concept_vector": [round(float(x), 7) for x in concept_vec],
    }
    info = save_correction(collection, name, corrector, encoder=encoder.name, dim=encoder.dim,
                           parameters=parameters, fitted_on=str(concept.source), report=report.to_dict(),
                           replace=replace)
    return FitResult(info=info, report=report, n_components=k, explained_share=share,
                     images_reused=images.reused if images else 0,
                     images_encoded=images.encoded if images else 0)
