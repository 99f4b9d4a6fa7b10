"""Fit a concept correction from a preliminary concept set and store it with its SCE report."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from indexing.collection import Collection
from indexing.correction_store import CorrectionInfo, check_correction_name, save_correction
from retrieval.concepts import ConceptSet
from sce_correct import SchurCorrector, SCEReport, sce_score
from sce_correct.corrector import DEFAULT_ENERGY

logger = logging.getLogger(__name__)

MODES = ("nullify", "focus")


@dataclass(frozen=True)
class FitResult:
    info: CorrectionInfo
    report: SCEReport
    n_components: int | None
    explained_share: float | None  # share of tr R that the chosen components hold


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def encode_concept_set(encoder, concept: ConceptSet, direction: str, *, progress: bool = False):
    """(source, target) embeddings for a direction: t2i texts->images, i2t images->texts, t2t texts->texts."""
    if direction == "t2t":
        if concept.targets is None:
            raise ValueError(f"a t2t correction needs text pairs (columns source,target); {concept.source} pairs images")
        return encoder.encode_texts(concept.prompts), encoder.encode_texts(concept.targets)
    if concept.images is None:
        raise ValueError(f"a {direction} correction needs prompt/image pairs; {concept.source} pairs texts")
    texts = encoder.encode_texts(concept.prompts)
    images = encoder.encode_images(concept.images, progress=progress)
    return (texts, images) if direction == "t2i" else (images, texts)


def fit_concept_correction(collection: Collection, encoder, concept: ConceptSet, *, name: str,
                           direction: str = "t2i", kernel: str = "cosine", mode: str = "nullify",
                           n_components: int | None = None, energy: float | None = None,
                           strength: float = 1.0, ridge: float = 1e-4, sigma: float | None = None,
                           rff_dim: int = 2500, seed: int = 0, replace: bool = False,
                           progress: bool = False) -> FitResult:
    """Encode the concept set with the collection's encoder, fit a SchurCorrector and store it.

    For the cosine kernel the projection size is fixed now (from `n_components` or `energy`)
    and stored with the correction, so every later search and re-index uses the same one.
    Nothing is written when any step fails.
    """
    check_correction_name(name)
    if mode not in MODES:
        raise ValueError(f"mode must be 'nullify' or 'focus', got {mode!r}")
    if kernel != "cosine" and (n_components is not None or energy is not None):
        raise ValueError("--components and --energy choose a projection, which needs the cosine kernel")
    collection.check_encoder(encoder.name, encoder.dim)
    source, target = encode_concept_set(encoder, concept, direction, progress=progress)
    corrector = SchurCorrector(direction=direction, kernel=kernel, ridge=ridge, strength=strength,
                               sigma=sigma, rff_dim=rff_dim, seed=seed).fit(source, target)
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
        "strength": strength, "ridge": ridge, "sigma": sigma, "rff_dim": rff_dim, "seed": seed,
        "n_pairs": len(concept), "distinct_prompts": len(set(concept.prompts)),
        "concept_vector": [round(float(x), 7) for x in concept_vec],
    }
    info = save_correction(collection, name, corrector, encoder=encoder.name, dim=encoder.dim,
                           parameters=parameters, fitted_on=str(concept.source), report=report.to_dict(),
                           replace=replace)
    return FitResult(info=info, report=report, n_components=k, explained_share=share)
