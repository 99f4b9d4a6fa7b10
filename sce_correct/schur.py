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

from ._checks import as_pair, check_choice, check_ridge
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
    """C_I, R and S as D x D matrices from feature rows."""

    def __init__(self, joint: np.ndarray, ridge: float):
        """`joint` = [Phi_T, Phi_I] (n x 2D), in float32 or float64."""
        n, D = joint.shape[0], joint.shape[1] // 2
        self.phi_i = joint[:, D:]
        # One symmetric product of the joint features gives all three blocks (BLAS syrk);
        # the D x D algebra after it is float64 whatever the input precision.
        G = (joint.T @ joint).astype(np.float64, copy=False)
        G /= n
        C_T, C_TI, self.C_I = G[:D, :D], G[:D, D:], symmetric_part(G[D:, D:])
        # R = C_IT (C_T + eps I)^-1 C_TI = B'B with B = L^-1 C_TI: one triangular solve, one product.
        L, _ = ridge_cholesky(C_T, ridge)
        B = linalg.solve_triangular(L, C_TI, lower=True, check_finite=False)
        self.R = symmetric_part(B.T @ B)
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


def decompose(text_emb, image_emb, *, kernel="cosine", sigma=None, rff_dim=2500, ridge=1e-4,
              seed=0, method="auto"):
    """Validated inputs -> a `_Primal` or `_Dual` decomposition, plus (kernel, sigma, method, n)."""
    text, image = as_pair(text_emb, image_emb, "text_emb", "image_emb")
    if text.shape[1] != image.shape[1]:
        raise InputError(
            f"text_emb has {text.shape[1]} columns and image_emb {image.shape[1]}: "
            "texts and images must come from the same encoder space"
        )
    check_choice(kernel, "kernel", KERNELS)
    ridge = check_ridge(ridge)
    n, d = text.shape
    sigma = resolve_sigma(kernel, sigma, text, image, seed)
    if kernel == "gaussian-exact":
        if method == "primal":
            raise InputError("kernel 'gaussian-exact' has no finite feature map: use method 'dual' or 'auto'")
        K_T = gaussian_kernel(text, text, sigma)
        K_I = gaussian_kernel(image, image, sigma)
        return _Dual(K_T, K_I, ridge), (kernel, sigma, "dual", n)
    fmap = make_feature_map(kernel, sigma=sigma, rff_dim=rff_dim, seed=seed)
    fmap.fit(text if kernel == "cosine" else np.vstack([text, image]))  # sigma is already resolved
    D = fmap.n_output_features_
    method = choose_method(method, n, D)
    if method == "primal":
        dtype = np.float32 if text.dtype == image.dtype == np.float32 and kernel == "cosine" else np.float64
        joint = np.empty((n, 2 * D), dtype=dtype)
        joint[:, :D] = fmap.transform(text)
        joint[:, D:] = fmap.transform(image)
        return _Primal(joint, ridge), (kernel, sigma, method, n)
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
    image, explained, schur = (_clip_desc(linalg.eigvalsh(M, check_finite=False)) for M in mats)
    return SchurSpectra(image=image, explained=explained, schur=schur, kernel=kernel, sigma=sigma,
                        method=method, n=n)
