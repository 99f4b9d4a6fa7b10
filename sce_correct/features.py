"""Feature maps phi with ||phi(v)|| = 1 (DESIGN.md section 2).

`CosineFeatures` normalises rows. `RandomFourierFeatures` approximates the Gaussian kernel
exp(-||v - v'||^2 / (2 sigma^2)) with one seeded draw of frequencies, kept in the fitted
object, so texts and images (and every later call) share the same map.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist

from ._checks import as_matrix
from .errors import InputError

# Rows of a subsample used by the median heuristic; pdist on more costs O(n^2) for no gain.
_MEDIAN_SAMPLE = 2000
# The kernel divides by sigma^2: outside this range it underflows to 0 or overflows.
_SIGMA_RANGE = (1e-150, 1e150)


def median_sample_rows(n_rows: int, *, seed: int = 0, max_rows: int = _MEDIAN_SAMPLE) -> np.ndarray | None:
    """The rows the median heuristic looks at: None for all of them, else a seeded subsample
    (so data that cannot be held in memory can read just these rows and get the same sigma)."""
    if n_rows > max_rows:
        return np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False)
    return None


def median_pairwise_distance(x: np.ndarray, *, seed: int = 0, max_rows: int = _MEDIAN_SAMPLE) -> float:
    """Median Euclidean distance between distinct rows (on a seeded subsample when large)."""
    x = as_matrix(x, "x", min_rows=2)
    rows = median_sample_rows(x.shape[0], seed=seed, max_rows=max_rows)
    if rows is not None:
        x = x[rows]
    d = pdist(x)
    d = d[d > 0]
    if d.size == 0:
        raise InputError("cannot pick sigma by the median heuristic: all rows are identical")
    return float(np.median(d))


def resolve_bandwidth(sigma, *data: np.ndarray, seed: int = 0) -> float:
    """The Gaussian bandwidth: ``sigma`` as a positive float or, when None, the median pairwise
    distance between the rows of ``data`` (the arrays stacked)."""
    if sigma is None:
        return median_pairwise_distance(data[0] if len(data) == 1 else np.vstack(data), seed=seed)
    value = float(sigma)
    if not _SIGMA_RANGE[0] <= value <= _SIGMA_RANGE[1]:  # NaN fails too
        raise InputError(f"sigma must be a positive number between 1e-150 and 1e150, got {sigma}")
    return value


def gaussian_kernel(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """Exact Gaussian kernel matrix exp(-||a_i - b_j||^2 / (2 sigma^2))."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    np.maximum(sq, 0.0, out=sq)
    return np.exp(-sq / (2.0 * sigma * sigma))


class CosineFeatures:
    """phi(v) = v / ||v||: the cosine kernel, feature dimension D = d."""

    kernel = "cosine"

    def fit(self, X, y=None) -> "CosineFeatures":
        X = as_matrix(X, "X")
        self.n_features_in_ = X.shape[1]
        self.n_output_features_ = X.shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        _check_fitted(self)
        X = as_matrix(X, "X")
        _check_dim(X, self.n_features_in_)
        # einsum: one fused pass, 4x faster than linalg.norm's square-then-reduce (same precision class)
        norms = np.sqrt(np.einsum("ij,ij->i", X, X))[:, None]
        if (norms == 0).any():
            raise InputError(f"X has {int((norms == 0).sum())} all-zero row(s); the cosine kernel needs nonzero vectors")
        return X / norms

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X).transform(X)

    def get_state(self) -> dict:
        return {"kind": "cosine", "n_features_in": self.n_features_in_}

    @classmethod
    def from_state(cls, state: dict, arrays: dict) -> "CosineFeatures":
        obj = cls()
        obj.n_features_in_ = obj.n_output_features_ = int(state["n_features_in"])
        return obj


class RandomFourierFeatures:
    """Random Fourier features for the Gaussian kernel.

    phi(v) = m^-1/2 [cos(w_j . v) for j, sin(w_j . v) for j], w_j ~ N(0, sigma^-2 I), so the
    output dimension is D = 2 * n_components and every row has unit norm.

    Parameters
    ----------
    sigma : float or None
        Kernel bandwidth. None picks the median pairwise distance of the data given to `fit`.
    n_components : int
        Number of random frequencies m.
    seed : int
        Seed of the one draw of frequencies.
    """

    kernel = "gaussian"

    def __init__(self, sigma: float | None = None, n_components: int = 2500, seed: int = 0):
        self.sigma = sigma
        self.n_components = n_components
        self.seed = seed

    def fit(self, X, y=None) -> "RandomFourierFeatures":
        X = as_matrix(X, "X")
        if int(self.n_components) < 1:
            raise InputError(f"n_components must be >= 1, got {self.n_components}")
        sigma = resolve_bandwidth(self.sigma, X, seed=self.seed)
        rng = np.random.default_rng(self.seed)
        self.sigma_ = sigma
        self.frequencies_ = rng.standard_normal((X.shape[1], int(self.n_components))) / sigma
        self.n_features_in_ = X.shape[1]
        self.n_output_features_ = 2 * int(self.n_components)
        return self

    def transform(self, X) -> np.ndarray:
        _check_fitted(self)
        X = as_matrix(X, "X")
        _check_dim(X, self.n_features_in_)
        proj = X @ self.frequencies_
        m = self.frequencies_.shape[1]
        out = np.empty((X.shape[0], 2 * m))
        np.cos(proj, out=out[:, :m])
        np.sin(proj, out=out[:, m:])
        out *= 1.0 / np.sqrt(m)
        return out

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X).transform(X)

    def get_state(self) -> dict:
        return {
            "kind": "gaussian",
            "sigma": self.sigma,
            "sigma_": self.sigma_,
            "n_components": int(self.n_components),
            "seed": int(self.seed),
            "n_features_in": self.n_features_in_,
        }

    @classmethod
    def from_state(cls, state: dict, arrays: dict) -> "RandomFourierFeatures":
        obj = cls(sigma=state["sigma"], n_components=state["n_components"], seed=state["seed"])
        obj.sigma_ = float(state["sigma_"])
        obj.frequencies_ = np.asarray(arrays["rff_frequencies"], dtype=np.float64)
        obj.n_features_in_ = int(state["n_features_in"])
        obj.n_output_features_ = 2 * obj.frequencies_.shape[1]
        return obj


def make_feature_map(kernel: str, *, sigma: float | None, rff_dim: int, seed: int):
    """The feature map for a kernel name ("cosine" or "gaussian")."""
    if kernel == "cosine":
        return CosineFeatures()
    if kernel == "gaussian":
        return RandomFourierFeatures(sigma=sigma, n_components=rff_dim, seed=seed)
    raise InputError(f"kernel must be 'cosine' or 'gaussian' for a feature map, got {kernel!r}")


def _check_fitted(obj) -> None:
    if not hasattr(obj, "n_features_in_"):
        raise ValueError(f"{type(obj).__name__} is not fitted yet: call fit(X) first")


def _check_dim(X: np.ndarray, expected: int) -> None:
    if X.shape[1] != expected:
        raise InputError(f"X has {X.shape[1]} columns but the feature map was fitted on {expected}")
