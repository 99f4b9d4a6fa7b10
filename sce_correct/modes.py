"""Modes: the top eigen-directions of the image covariance C_I ("original") or of the Schur
complement S ("Schur", what the prompts do not explain), each with its top-scoring images.

An image's score on a mode v is phi(x) . v; in the dual, with u an eigenvector of
A K_I A / n (eigenvalue mu, A = I for C_I or (I - H)^1/2 for S), the scores are
K_I A u / sqrt(n mu).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from ._checks import as_matrix
from .errors import InputError
from .features import gaussian_kernel, make_feature_map
from .schur import _Primal, choose_method, decompose, resolve_sigma, symmetric_part


@dataclass(frozen=True)
class Mode:
    """One eigen-direction: its eigenvalue, share of tr C_I, and its top images (indices, scores)."""

    rank: int
    eigenvalue: float
    share: float
    top_indices: np.ndarray
    top_scores: np.ndarray
    scores: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "rank": self.rank, "eigenvalue": self.eigenvalue, "share": self.share,
            "top_indices": self.top_indices.tolist(), "top_scores": self.top_scores.tolist(),
        }


def _top_eigh(M: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of a symmetric matrix, descending."""
    size = M.shape[0]
    k = min(k, size)
    lam, vec = linalg.eigh(symmetric_part(M), subset_by_index=[size - k, size - 1], check_finite=False)
    return lam[::-1], vec[:, ::-1]


def _modes_from_scores(lam: np.ndarray, scores: np.ndarray, total: float, top: int) -> list[Mode]:
    modes = []
    for j in range(scores.shape[1]):
        s = scores[:, j]
        if s[np.argmax(np.abs(s))] < 0:  # eigenvectors have no sign: make the strongest image score positive
            s = -s
        top_idx = np.argsort(-s, kind="stable")[:top]
        eig = float(max(lam[j], 0.0))
        modes.append(Mode(rank=j, eigenvalue=eig, share=eig / total if total > 0 else 0.0,
                          top_indices=top_idx, top_scores=s[top_idx], scores=s))
    return modes


def _dual_modes(K_I: np.ndarray, A: np.ndarray | None, n_modes: int, top: int) -> list[Mode]:
    n = K_I.shape[0]
    AKA = K_I if A is None else A @ K_I @ A
    lam, U = _top_eigh(AKA / n, n_modes)
    keep = lam > 1e-12
    lam, U = lam[keep], U[:, keep]
    AU = U if A is None else A @ U
    scores = (K_I @ AU) / np.sqrt(n * lam)
    return _modes_from_scores(lam, scores, float(np.trace(K_I)) / n, top)


def _primal_modes(M: np.ndarray, phi_i: np.ndarray, total: float, n_modes: int, top: int) -> list[Mode]:
    lam, V = _top_eigh(M, n_modes)
    return _modes_from_scores(lam, phi_i @ V, total, top)


def _check_counts(n_modes: int, top: int) -> None:
    if int(n_modes) < 1 or int(top) < 1:
        raise InputError(f"n_modes and top must be >= 1, got {n_modes} and {top}")


def schur_modes(text_emb, image_emb, *, n_modes: int = 8, top: int = 16, kernel: str = "cosine",
                sigma: float | None = None, rff_dim: int = 2500, ridge: float = 1e-4, seed: int = 0,
                method: str = "auto") -> list[Mode]:
    """Top eigen-directions of the Schur complement S: the image variety the prompts leave unexplained."""
    _check_counts(n_modes, top)
    dec, _ = decompose(text_emb, image_emb, kernel=kernel, sigma=sigma, rff_dim=rff_dim, ridge=ridge,
                       seed=seed, method=method, keep_features=True)
    if isinstance(dec, _Primal):
        return _primal_modes(dec.S, dec.phi_i, float(np.trace(dec.C_I)), n_modes, top)
    return _dual_modes(dec.K_I, dec.sqrt_G, n_modes, top)


def kernel_modes(image_emb, *, n_modes: int = 8, top: int = 16, kernel: str = "cosine",
                 sigma: float | None = None, rff_dim: int = 2500, seed: int = 0,
                 method: str = "auto") -> list[Mode]:
    """Top eigen-directions of the image covariance C_I alone (the "original" modes)."""
    _check_counts(n_modes, top)
    image = as_matrix(image_emb, "image_emb", min_rows=2)
    sigma = resolve_sigma(kernel, sigma, image, image[:0], seed)  # None for the cosine kernel
    n = image.shape[0]
    if kernel == "gaussian-exact":
        return _dual_modes(gaussian_kernel(image, image, sigma), None, n_modes, top)
    phi = make_feature_map(kernel, sigma=sigma, rff_dim=rff_dim, seed=seed).fit(image).transform(image)
    phi = phi.astype(np.float64, copy=False)
    if choose_method(method, n, phi.shape[1]) == "primal":
        return _primal_modes(symmetric_part(phi.T @ phi) / n, phi, 1.0, n_modes, top)
    return _dual_modes(phi @ phi.T, None, n_modes, top)
