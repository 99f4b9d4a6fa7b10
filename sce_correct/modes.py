"""Modes: the top eigen-directions of the image covariance C_I ("original") or of the Schur
complement S ("Schur", what the prompts do not explain), each with its top-scoring images.

An image's score on a mode v is phi(x) . v; in the dual, with u an eigenvector of
A K_I A / n (eigenvalue mu, A = I for C_I or (I - H)^1/2 for S), the scores are
K_I A u / sqrt(n mu).

`paired_spectra_and_modes` is the collection-scale form: the covariances are summed over
batches of pairs (pass one), the modes' directions come from them, and a second pass over
the image batches scores every image on them, keeping only each mode's top images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from ._checks import as_matrix, check_ridge
from .covariance import CovarianceAccumulator
from .errors import InputError
from .features import gaussian_kernel, make_feature_map
from .schur import (SchurSpectra, _Primal, _spectra, accumulate_features, choose_method, decompose, resolve_sigma,
                    streaming_feature_map, symmetric_part)


@dataclass(frozen=True)
class Mode:
    """One eigen-direction: its eigenvalue, share of tr C_I, and its top images (indices, scores)."""

    rank: int
    eigenvalue: float
    share: float
    top_indices: np.ndarray
    top_scores: np.ndarray
    scores: np.ndarray | None = field(repr=False)  # every image's score; None when streamed

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


class ModeRanker:
    """Each mode's top images over batches of scores, without keeping every score.

    The rule of the in-memory modes, exactly: a mode's sign makes its strongest score (the
    first row of largest |score|) positive, and its images are ranked by descending score,
    ties by row order (a stable sort). Rows are numbered in the order the batches come.
    """

    def __init__(self, eigvals: np.ndarray, total: float, top: int, directions: np.ndarray | None = None):
        self.eigvals = np.asarray(eigvals, dtype=np.float64)
        self.total = float(total)
        self.top = int(top)
        self.directions = directions  # D x k: `update` scores feature rows on them
        k = len(self.eigvals)
        self.rows = 0
        self._strongest = np.full(k, -1.0)  # largest |score| so far, and its sign
        self._sign = np.ones(k)
        # best `top` (row, score) for the score and for its negative, per mode
        self._best = [[(np.zeros(0, np.int64), np.zeros(0)) for _ in range(k)] for _ in range(2)]

    def update(self, features: np.ndarray) -> "ModeRanker":
        """Score a batch of feature rows phi(x) on the directions (phi(x) . v)."""
        return self.update_scores(features @ self.directions)

    def update_scores(self, scores: np.ndarray) -> "ModeRanker":
        scores = np.asarray(scores, dtype=np.float64)
        rows = np.arange(self.rows, self.rows + len(scores), dtype=np.int64)
        self.rows += len(scores)
        if not len(scores):
            return self
        magnitude = np.abs(scores)
        first = np.argmax(magnitude, axis=0)
        for j in range(scores.shape[1]):
            s = scores[:, j]
            m = magnitude[first[j], j]
            if m > self._strongest[j]:  # strictly: an earlier row keeps a tie
                self._strongest[j], self._sign[j] = m, (-1.0 if s[first[j]] < 0 else 1.0)
            for side, signed in enumerate((s, -s)):
                self._best[side][j] = self._keep(*self._best[side][j], rows, signed)
        return self

    def _keep(self, best_rows, best_scores, rows, scores):
        if len(scores) > self.top:  # only rows at or above the top-th score can enter (ties kept)
            cut = np.partition(scores, len(scores) - self.top)[len(scores) - self.top]
            keep = scores >= cut
            rows, scores = rows[keep], scores[keep]
        rows, scores = np.concatenate([best_rows, rows]), np.concatenate([best_scores, scores])
        order = np.lexsort((rows, -scores))[: self.top]
        return rows[order], scores[order]

    def modes(self, scores: np.ndarray | None = None) -> list[Mode]:
        """The modes; ``scores`` (every row's, when the caller kept them) are signed like the rest."""
        out = []
        for j, lam in enumerate(self.eigvals):
            side = 0 if self._sign[j] > 0 else 1
            top_rows, top_scores = self._best[side][j]
            eig = float(max(lam, 0.0))
            every = None if scores is None else self._sign[j] * scores[:, j]
            out.append(Mode(rank=j, eigenvalue=eig, share=eig / self.total if self.total > 0 else 0.0,
                            top_indices=top_rows, top_scores=top_scores, scores=every))
        return out


def _modes_from_scores(lam: np.ndarray, scores: np.ndarray, total: float, top: int) -> list[Mode]:
    return ModeRanker(lam, total, top).update_scores(scores).modes(scores)


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
        C_I = CovarianceAccumulator(shift=False)._add(phi, None).covariances().C_XX  # phi is left as it is
        return _primal_modes(C_I, phi, 1.0, n_modes, top)
    return _dual_modes(phi @ phi.T, None, n_modes, top)


def paired_spectra_and_modes(pair_batches, image_batches, *, n_modes: int = 8, top: int = 16,
                             kernel: str = "cosine", sigma: float | None = None, rff_dim: int = 2500,
                             ridge: float = 1e-4, seed: int = 0) -> tuple[SchurSpectra, list[Mode], list[Mode]]:
    """Spectra, original modes (of C_I) and Schur modes (of S) of pairs seen batch by batch.

    ``pair_batches``: an iterable of (text_emb, image_emb) batches (pass one: covariances in
    O(D^2) memory). ``image_batches``: a callable returning the image batches again, in the
    same row order (pass two: every image scored on the 2 * n_modes directions; only each
    mode's ``top`` images are kept, so the modes carry no per-image ``scores``). Primal form;
    the gaussian kernel needs ``sigma``. The same numbers as `schur_spectra`, `kernel_modes`
    and `schur_modes` on the stacked rows with that sigma (up to rounding; the in-memory
    forms work in the dual when n < D).
    """
    _check_counts(n_modes, top)
    fmap, sigma = streaming_feature_map(kernel, sigma, rff_dim, seed)
    ridge = check_ridge(ridge)
    acc, _ = accumulate_features(pair_batches, fmap, kernel=kernel, accumulator=CovarianceAccumulator(shift=False))
    cov = acc.covariances()
    dec = _Primal(cov, ridge)
    spectra = _spectra((dec.C_I, dec.R, dec.S), kernel, sigma, "primal", cov.n)
    total = float(np.trace(dec.C_I))
    lam_o, V_o = _top_eigh(dec.C_I, n_modes)
    lam_s, V_s = _top_eigh(dec.S, n_modes)
    k = len(lam_o)
    ranker = ModeRanker(np.r_[lam_o, lam_s], total, top, np.hstack([V_o, V_s]))
    for batch in image_batches():
        batch = np.asarray(batch)
        if batch.ndim == 2 and len(batch):
            ranker.update(fmap.transform(batch))
    if ranker.rows != cov.n:
        raise InputError(f"the second pass gave {ranker.rows} images, the first {cov.n} pairs: "
                         "image_batches must give the same rows in the same order")
    modes = ranker.modes()
    schur = [Mode(rank=m.rank - k, eigenvalue=m.eigenvalue, share=m.share, top_indices=m.top_indices,
                  top_scores=m.top_scores, scores=None) for m in modes[k:]]
    return spectra, modes[:k], schur
