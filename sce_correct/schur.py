"""Covariances, the ridge regression Gamma and the Schur complement S = C_I - R (DESIGN.md section 2).

Everything is computed in the primal (D x D covariances) or in the dual (n x n kernel
matrices), whichever is smaller; both give the same numbers. The ridge is explicit and
absolute (added to the diagonal); nothing relies on a pseudo-inverse cut-off.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import linalg

from ._checks import as_matrix, as_pair, check_choice, check_ridge
from .covariance import CovarianceAccumulator, Covariances
from .errors import InputError
from .features import gaussian_kernel, make_feature_map, resolve_bandwidth

KERNELS = ("cosine", "gaussian", "gaussian-exact")
METHODS = ("auto", "primal", "dual")


def ridge_cholesky(C: np.ndarray, ridge: float, what: str = "C_T"):
    """Cholesky factor of C + ridge * I, or a ValueError that says to raise the ridge."""
    A = C + ridge * np.eye(C.shape[0])
    try:
        return linalg.cho_factor(A, lower=True, check_finite=False)
    except linalg.LinAlgError:
        raise InputError(
            f"{what} + ridge*I is singular (ridge={ridge:g}); use a ridge > 0 "
            "(the system never falls back to a pseudo-inverse)"
        ) from None


def symmetric_part(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + M.T)


def explained_covariance(C_S: np.ndarray, C_ST: np.ndarray, ridge: float, *, what: str = "C_T",
                         with_gamma: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """R = C_TS (C_S + eps I)^-1 C_ST and, when asked, Gamma = (C_S + eps I)^-1 C_ST.

    With L the Cholesky factor of C_S + eps I and B = L^-1 C_ST: R = B'B (PSD by
    construction, one syrk) and Gamma = L'^-1 B: two triangular solves, no inverse.
    """
    L, _ = ridge_cholesky(C_S, ridge, what)
    B = linalg.solve_triangular(L, C_ST, lower=True, check_finite=False)
    R = symmetric_part(B.T @ B)
    gamma = linalg.solve_triangular(L, B, lower=True, trans="T", check_finite=False) if with_gamma else None
    return R, gamma


def choose_method(method: str, n: int, D: int | None) -> str:
    """'primal' works on D x D matrices, 'dual' on n x n: pick the smaller unless told."""
    check_choice(method, "method", METHODS)
    if method != "auto":
        return method
    return "dual" if D is None or n < D else "primal"


@dataclass(frozen=True)
class SchurSpectra:
    """Eigenvalues (descending, clipped at 0) of C_I, R (text-explained) and S (Schur complement)."""

    image: np.ndarray
    explained: np.ndarray
    schur: np.ndarray
    kernel: str
    sigma: float | None
    method: str
    n: int


def _clip_desc(eigvals: np.ndarray) -> np.ndarray:
    return np.clip(np.sort(eigvals)[::-1], 0.0, None)


class _Primal:
    """C_I, R and S as D x D matrices from the covariances of the feature rows."""

    def __init__(self, cov: Covariances, ridge: float, phi_i: np.ndarray | None = None):
        """``cov``: X = text features, Y = image features; ``phi_i`` the image feature rows
        when the caller keeps them (in-memory modes score them)."""
        self.phi_i = phi_i
        self.C_I = cov.C_YY
        self.R, _ = explained_covariance(cov.C_XX, cov.C_XY, ridge)
        self.S = self.C_I - self.R


class _Dual:
    """The same decomposition through n x n kernel matrices.

    With K_T = Q diag(l) Q' and H = K_T (K_T + n eps I)^-1 = Q diag(l / (l + n eps)) Q',
    the nonzero eigenvalues of R and S are those of H^1/2 K_I H^1/2 / n and
    (I - H)^1/2 K_I (I - H)^1/2 / n.
    """

    def __init__(self, K_T: np.ndarray, K_I: np.ndarray, ridge: float):
        n = K_T.shape[0]
        lam, Q = linalg.eigh(symmetric_part(K_T), check_finite=False)
        lam = np.clip(lam, 0.0, None)
        if ridge == 0:
            if lam[0] <= 1e-12 * max(lam[-1], 1e-300):
                raise InputError(
                    "the text kernel matrix is singular and ridge=0; use a ridge > 0 "
                    "(the system never falls back to a pseudo-inverse)"
                )
            h = np.ones_like(lam)
        else:
            h = lam / (lam + n * ridge)
        self.n = n
        self.K_I = symmetric_part(K_I)
        self._Q, self._h = Q, h

    # Each n x n square root is built only when asked for (schur_modes needs sqrt_G alone).
    @cached_property
    def sqrt_H(self) -> np.ndarray:
        return (self._Q * np.sqrt(self._h)) @ self._Q.T

    @cached_property
    def sqrt_G(self) -> np.ndarray:
        return (self._Q * np.sqrt(np.clip(1.0 - self._h, 0.0, None))) @ self._Q.T

    def explained_matrix(self) -> np.ndarray:
        return symmetric_part(self.sqrt_H @ self.K_I @ self.sqrt_H) / self.n

    def schur_matrix(self) -> np.ndarray:
        return symmetric_part(self.sqrt_G @ self.K_I @ self.sqrt_G) / self.n

    def image_matrix(self) -> np.ndarray:
        return self.K_I / self.n


def resolve_sigma(kernel: str, sigma: float | None, text: np.ndarray, image: np.ndarray, seed: int):
    """None for the cosine kernel, else the bandwidth: ``sigma``, or the median heuristic on texts and images."""
    if kernel == "cosine":
        return None
    # float() first: an error message shows the converted value (e.g. "got 0.0")
    return resolve_bandwidth(None if sigma is None else float(sigma), text, image, seed=seed)


def feature_dtype(a: np.ndarray, b: np.ndarray, kernel: str):
    """float32 products only for the cosine kernel of two float32 inputs; else float64."""
    return np.float32 if a.dtype == b.dtype == np.float32 and kernel == "cosine" else np.float64


def paired_inputs(text_emb, image_emb, *, kernel="cosine", sigma=None, seed=0):
    """(text, image, sigma): the pairs validated and the bandwidth resolved (None for the
    cosine kernel, else ``sigma`` or the median heuristic on texts and images)."""
    text, image = as_pair(text_emb, image_emb, "text_emb", "image_emb")
    if text.shape[1] != image.shape[1]:
        raise InputError(
            f"text_emb has {text.shape[1]} columns and image_emb {image.shape[1]}: "
            "texts and images must come from the same encoder space"
        )
    check_choice(kernel, "kernel", KERNELS)
    return text, image, resolve_sigma(kernel, sigma, text, image, seed)


def decompose(text_emb, image_emb, *, kernel="cosine", sigma=None, rff_dim=2500, ridge=1e-4,
              seed=0, method="auto", keep_features=False):
    """Validated inputs -> a `_Primal` or `_Dual` decomposition, plus (kernel, sigma, method, n)."""
    text, image, sigma = paired_inputs(text_emb, image_emb, kernel=kernel, sigma=sigma, seed=seed)
    ridge = check_ridge(ridge)
    n, d = text.shape
    if kernel == "gaussian-exact":
        if method == "primal":
            raise InputError("kernel 'gaussian-exact' has no finite feature map: use method 'dual' or 'auto'")
        K_T = gaussian_kernel(text, text, sigma)
        K_I = gaussian_kernel(image, image, sigma)
        return _Dual(K_T, K_I, ridge), (kernel, sigma, "dual", n)
    fmap = make_feature_map(kernel, sigma=sigma, rff_dim=rff_dim, seed=seed)
    fmap.fit(text)  # sigma is already resolved: fit only reads the dimension
    D = fmap.n_output_features_
    method = choose_method(method, n, D)
    if method == "primal":
        if not keep_features:
            acc, _ = accumulate_features(row_blocks(text, image), fmap, kernel=kernel,
                                         accumulator=CovarianceAccumulator(shift=False))  # uncentred only
            return _Primal(acc.covariances(), ridge), (kernel, sigma, method, n)
        dtype = feature_dtype(text, image, kernel)
        phi_t = fmap.transform(text).astype(dtype, copy=False)
        phi_i = fmap.transform(image).astype(dtype, copy=False)
        acc = CovarianceAccumulator()._add(phi_t, phi_i.copy())  # phi_i stays: the modes score it
        return _Primal(acc.covariances(), ridge, phi_i), (kernel, sigma, method, n)
    phi_t = fmap.transform(text).astype(np.float64, copy=False)
    phi_i = fmap.transform(image).astype(np.float64, copy=False)
    return _Dual(phi_t @ phi_t.T, phi_i @ phi_i.T, ridge), (kernel, sigma, method, n)


def schur_spectra(text_emb, image_emb, *, kernel="cosine", sigma=None, rff_dim=2500, ridge=1e-4,
                  seed=0, method="auto") -> SchurSpectra:
    """Eigenvalues of C_I, R and S for paired text and image embeddings."""
    dec, (kernel, sigma, method, n) = decompose(
        text_emb, image_emb, kernel=kernel, sigma=sigma, rff_dim=rff_dim, ridge=ridge, seed=seed, method=method
    )
    if isinstance(dec, _Primal):
        mats = dec.C_I, dec.R, dec.S
    else:
        mats = dec.image_matrix(), dec.explained_matrix(), dec.schur_matrix()
    return _spectra(mats, kernel, sigma, method, n)


def _spectra(mats, kernel, sigma, method, n) -> SchurSpectra:
    image, explained, schur = (_clip_desc(np.linalg.eigvalsh(M)) for M in mats)
    return SchurSpectra(image=image, explained=explained, schur=schur, kernel=kernel, sigma=sigma,
                        method=method, n=n)


# ------------------------------------------------------------------ streaming (primal only)
# Rows per block when arrays in memory are summed: a block's features stay in cache between
# the feature map, the shift and the products (n = 10,000 x 512 float32: 142 ms for the score
# in blocks of 4,096 against 154 ms in one block), and no (n, D) feature matrix is made.
BLOCK_ROWS = 4096


def row_blocks(*arrays: np.ndarray, rows: int = BLOCK_ROWS):
    """Aligned row blocks (views) of equally long arrays."""
    for start in range(0, len(arrays[0]), rows):
        yield tuple(a[start:start + rows] for a in arrays)

def streaming_feature_map(kernel: str, sigma, rff_dim: int, seed: int):
    """The feature map for data seen batch by batch: the bandwidth cannot come from the
    median heuristic (that needs every row), so the gaussian kernel needs ``sigma``."""
    check_choice(kernel, "kernel", KERNELS)
    if kernel == "gaussian-exact":
        raise InputError("kernel 'gaussian-exact' has no finite feature map, so it cannot be accumulated "
                         "batch by batch: use 'gaussian' (random Fourier features) or the in-memory form")
    if kernel == "gaussian":
        if sigma is None:
            raise InputError("the gaussian kernel needs sigma when the data come in batches (the median "
                             "heuristic needs every row): pass sigma, e.g. median_pairwise_distance of a sample")
        sigma = resolve_bandwidth(float(sigma))
    return make_feature_map(kernel, sigma=sigma, rff_dim=rff_dim, seed=seed), sigma


def accumulate_features(batches, fmap, *, kernel: str, names=("text_emb", "image_emb"),
                        accumulator: CovarianceAccumulator | None = None):
    """Feed (a, b) raw embedding batches through ``fmap`` (fitted on the first batch when not
    yet fitted) into a CovarianceAccumulator; returns it and the largest norm of a's features
    (the corrector's overflow check needs it).

    Row i of a pairs with row i of b. Empty batches are skipped; every batch must have the
    columns of the first.
    """
    acc = CovarianceAccumulator() if accumulator is None else accumulator
    max_norm = 0.0
    for pair in batches:
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise InputError(f"each batch must be a pair ({names[0]}, {names[1]}), got {type(pair).__name__}") from None
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 2 and b.ndim == 2 and len(a) == 0 and len(b) == 0:
            continue
        a, b = as_matrix(a, names[0]), as_matrix(b, names[1])
        if len(a) != len(b):
            raise InputError(f"a batch has {len(a)} rows of {names[0]} and {len(b)} of {names[1]}: they must pair up")
        if a.shape[1] != b.shape[1]:
            raise InputError(f"{names[0]} has {a.shape[1]} columns and {names[1]} {b.shape[1]}: "
                             "both sides must come from the same encoder space")
        if not hasattr(fmap, "n_features_in_"):
            fmap.fit(a)  # the bandwidth is already fixed: fit only reads the dimension
        dtype = feature_dtype(a, b, kernel)
        phi_a = fmap.transform(a).astype(dtype, copy=False)
        max_norm = max(max_norm, float(np.sqrt(np.max(np.einsum("ij,ij->i", phi_a, phi_a)))))
        acc._add(phi_a, fmap.transform(b).astype(dtype, copy=False))
    if acc.n < 2:
        raise InputError(f"need at least 2 pairs, got {acc.n}")
    return acc, max_norm


def schur_spectra_batches(batches, *, kernel="cosine", sigma=None, rff_dim=2500, ridge=1e-4,
                          seed=0) -> SchurSpectra:
    """`schur_spectra` of pairs given as an iterable of (text_emb, image_emb) batches, in
    O(D^2) memory (primal form; the gaussian kernel needs ``sigma``)."""
    ridge = check_ridge(ridge)
    fmap, sigma = streaming_feature_map(kernel, sigma, rff_dim, seed)
    acc, _ = accumulate_features(batches, fmap, kernel=kernel, accumulator=CovarianceAccumulator(shift=False))
    return spectra_from_covariances(acc.covariances(), ridge=ridge, kernel=kernel, sigma=sigma)


def spectra_from_covariances(cov: Covariances, *, ridge: float, kernel: str = "cosine",
                             sigma: float | None = None) -> SchurSpectra:
    """The spectra of uncentred text (X) / image (Y) feature covariances."""
    if cov.centered or cov.C_XY is None:
        raise InputError("the SCE spectra need the uncentred covariances of paired text and image features")
    dec = _Primal(cov, check_ridge(ridge))
    return _spectra((dec.C_I, dec.R, dec.S), kernel, sigma, "primal", cov.n)
