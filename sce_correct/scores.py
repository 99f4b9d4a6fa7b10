"""Scores from spectra: the SCE score E(S), E(R), shares, Vendi and RKE (DESIGN.md section 2).

Pure functions from eigenvalues to numbers; `sce_score` is the one-call entry point.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .covariance import Covariances
from .schur import SchurSpectra, schur_spectra, schur_spectra_batches, spectra_from_covariances


def _eigvals(eigvals) -> np.ndarray:
    lam = np.asarray(eigvals, dtype=np.float64).ravel()
    return np.clip(lam, 0.0, None)  # round-off can leave tiny negatives on a PSD matrix


def matrix_entropy_score(eigvals) -> float:
    """E(M) = exp(-sum_i l_i log(l_i / sum_j l_j)) for the eigenvalues l of a PSD matrix M.

    The weights are the eigenvalues themselves, not their normalisation, so a component
    holding a small share of the trace counts for little (for a trace-1 matrix this is
    the Vendi score).
    """
    lam = _eigvals(eigvals)
    total = lam.sum()
    if total <= 0:
        return 1.0
    nz = lam[lam > 0]
    return float(np.exp(-np.sum(nz * np.log(nz / total))))


def vendi_score(eigvals) -> float:
    """exp of the Shannon entropy of the normalised eigenvalues."""
    lam = _eigvals(eigvals)
    p = lam[lam > 0] / lam.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def rke_score(eigvals) -> float:
    """Renyi kernel entropy mode count, 1 / sum p_i^2 of the normalised eigenvalues."""
    lam = _eigvals(eigvals)
    p = lam / lam.sum()
    return float(1.0 / np.sum(p * p))


@dataclass(frozen=True)
class SCEReport:
    """How much of an image set's variety the prompts explain, and how much is the images' own.

    image_diversity is the SCE score E(S); text_diversity is E(R); image_share = tr S and
    text_share = tr R add up to tr C_I = 1; vendi and rke describe the image set alone.
    """

    image_diversity: float
    text_diversity: float
    image_share: float
    text_share: float
    vendi: float
    rke: float
    n: int
    kernel: str = "cosine"
    sigma: float | None = None
    ridge: float = 1e-4
    method: str = "primal"

    def to_dict(self) -> dict:
        return asdict(self)


def sce_score(text_emb, image_emb, *, kernel: str = "cosine", sigma: float | None = None,
              rff_dim: int = 2500, ridge: float = 1e-4, seed: int = 0, method: str = "auto") -> SCEReport:
    """The SCE report of paired prompt/image embeddings (row i of each is one pair).

    kernel: "cosine", "gaussian" (random Fourier features, `rff_dim` frequencies) or
    "gaussian-exact" (the exact Gaussian kernel, dual form). sigma=None takes the median
    pairwise distance of all embeddings. method: "auto" picks primal (D x D) or dual (n x n)
    by size; both give the same numbers.
    """
    spectra = schur_spectra(text_emb, image_emb, kernel=kernel, sigma=sigma, rff_dim=rff_dim,
                            ridge=ridge, seed=seed, method=method)
    return report_from_spectra(spectra, ridge=ridge)


def sce_score_batches(batches, *, kernel: str = "cosine", sigma: float | None = None, rff_dim: int = 2500,
                      ridge: float = 1e-4, seed: int = 0) -> SCEReport:
    """`sce_score` of pairs given as an iterable of (text_emb, image_emb) batches (for example
    shards of a collection), in O(D^2) memory: the covariances are summed batch by batch.

    The same numbers as `sce_score` on the stacked rows (primal form; when n < D the
    in-memory form works in the dual, equal up to rounding). The gaussian kernel needs
    ``sigma``; "gaussian-exact" has no streaming form.
    """
    spectra = schur_spectra_batches(batches, kernel=kernel, sigma=sigma, rff_dim=rff_dim, ridge=ridge, seed=seed)
    return report_from_spectra(spectra, ridge=ridge)


def sce_score_from_covariances(cov: Covariances, *, ridge: float = 1e-4, kernel: str = "cosine",
                               sigma: float | None = None) -> SCEReport:
    """The SCE report from already accumulated uncentred covariances (X = text features, Y =
    image features), e.g. partial sums of several workers merged with CovarianceAccumulator.merge."""
    return report_from_spectra(spectra_from_covariances(cov, ridge=ridge, kernel=kernel, sigma=sigma), ridge=ridge)


def report_from_spectra(spectra: SchurSpectra, *, ridge: float) -> SCEReport:
    """The SCE report of already computed spectra (for callers that also need the spectra)."""
    return SCEReport(
        image_diversity=matrix_entropy_score(spectra.schur),
        text_diversity=matrix_entropy_score(spectra.explained),
        image_share=float(spectra.schur.sum()),
        text_share=float(spectra.explained.sum()),
        vendi=vendi_score(spectra.image),
        rke=rke_score(spectra.image),
        n=spectra.n,
        kernel=spectra.kernel,
        sigma=spectra.sigma,
        ridge=float(ridge),
        method=spectra.method,
    )
