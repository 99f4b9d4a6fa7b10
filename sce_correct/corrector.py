"""SchurCorrector: learn from preliminary pairs what one side explains in the other, and remove it.

t2i removes from an image what its text explains (source = texts, target = images); i2t swaps
the roles; t2t has texts on both sides. The paired correction is
    target~ = phi(target) - strength * Gamma' phi(source),  Gamma = (C_S + eps I)^-1 C_ST,
and, for the cosine kernel, `projection` gives the d x d matrix that removes (or keeps only)
the top eigen-directions of R = C_TS Gamma, for collections whose items have no paired source.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
from scipy import linalg

from ._checks import as_matrix, as_pair, check_choice, check_ridge
from .errors import InputError
from .saved import check_format, read_npz, write_npz
from .covariance import CovarianceAccumulator, Covariances
from .features import CosineFeatures, RandomFourierFeatures, make_feature_map
from .schur import (accumulate_features, choose_method, explained_covariance, ridge_cholesky, row_blocks,
                    streaming_feature_map, symmetric_part)

DIRECTIONS = ("t2i", "i2t", "t2t")
FILE_FORMAT = "sce_correct.SchurCorrector"
FILE_VERSION = 1
# 0.99, not 0.95: a concept set with m distinct prompts gives R rank m, and its smallest
# direction can hold ~1 % of tr R yet carry much of the concept (skin tone: the 5th of 5
# directions of the uncentred R holds 1.4 %; leaving it, a linear probe still reads the tone at
# 0.43 instead of 0.13).
DEFAULT_ENERGY = 0.99
# Largest size |strength| * ||Gamma' phi(source)|| a corrected feature may reach: the index
# stores float32 and normalises rows (squares must stay below float32's 3.4e38).
MAX_CORRECTION_NORM = 1e15


def _check_groups(groups, n: int, center: bool) -> np.ndarray:
    if not center:
        raise InputError("groups centre the features within each group: they need center=True")
    labels = np.asarray(groups)
    if labels.shape != (n,):
        raise InputError(f"groups must give one label per pair ({n}), got shape {labels.shape}")
    if len(np.unique(labels)) == n:
        raise InputError("every pair is a group of its own: centred within groups, nothing is left to fit "
                         "(a group needs pairs that differ in the concept)")
    return labels


def group_centred(phi: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows minus the mean of their group."""
    _, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse)
    sums = np.zeros((len(counts), phi.shape[1]))
    np.add.at(sums, inverse, phi)
    return phi - (sums / counts[:, None])[inverse]


class SchurCorrector:
    """Schur-complement correction learned from preliminary (source, target) pairs.

    Parameters
    ----------
    direction : "t2i", "i2t" or "t2t"
        Which side is explained (target) by which (source); a label for the caller, the
        mathematics is the same.
    kernel : "cosine" or "gaussian"
        "gaussian" uses random Fourier features; its corrected features live in the
        2 * rff_dim feature space (good for image-to-image search and clustering, not for
        text queries) and it has no `projection`.
    ridge : float >= 0
        Absolute ridge added to the source covariance.
    strength : float
        s in the paired correction: 1 nullifies the concept, a negative value focuses on it.
    sigma, rff_dim, seed :
        Gaussian kernel bandwidth (None = median heuristic), number of random frequencies
        and the seed of their one draw.
    method : "auto", "primal" or "dual"
        How Gamma is computed; "auto" uses the n x n dual when n < D.
    center : bool
        Centre both sides' features by their means over the preliminary pairs before the
        covariances (default False: the uncentred covariances of the SCE contract). Centred,
        R holds only what varies with the prompts: for prompts that differ only in the concept
        ("light skin tone", ..., "dark skin tone") its directions span the differences between
        the concept values' mean images, not the content all the concept images share, so a
        projection removes the concept while keeping what the concept set has in common
        (hands, faces). The paired correction then removes the explained variation around
        the mean: target~ = phi(target) - strength * Gamma' (phi(source) - mean_source).

    Fitted attributes: feature_map_, gamma_ (D x D), n_samples_, n_features_in_,
    explained_eigvals_ and explained_eigvecs_ (cosine kernel: eigen-decomposition of R,
    descending), source_mean_ and target_mean_ (feature means when centred, else None).

    scikit-learn's conventions hold: `__init__` only stores the parameters, `get_params` /
    `set_params` read and write them, so `sklearn.base.clone` gives an unfitted copy (this
    module does not import scikit-learn). Parameters are checked when `fit` uses them.
    """

    def __init__(self, direction: str = "t2i", kernel: str = "cosine", ridge: float = 1e-4,
                 strength: float = 1.0, sigma: float | None = None, rff_dim: int = 2500, seed: int = 0,
                 method: str = "auto", center: bool = False):
        self.direction = direction
        self.kernel = kernel
        self.ridge = ridge
        self.strength = strength
        self.sigma = sigma
        self.rff_dim = rff_dim
        self.seed = seed
        self.method = method
        self.center = center

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, source_emb, target_emb, groups=None) -> "SchurCorrector":
        """Learn Gamma from preliminary pairs: row i of `source_emb` pairs with row i of `target_emb`.

        ``groups`` (one label per pair, with ``center=True``): centre the features within each
        group instead of over all pairs, so that what differs between groups (the object in
        "waving hand, dark skin tone" / "thumbs up, light skin tone") is not what the source
        explains, only what varies inside a group (the concept). The fit is then computed
        in memory; ``source_mean_`` / ``target_mean_`` stay the overall means (what the paired
        correction subtracts for an item whose group it does not know).
        """
        ridge = self._check_params()
        source, target = as_pair(source_emb, target_emb, "source_emb", "target_emb")
        if source.shape[1] != target.shape[1]:
            raise InputError(
                f"source_emb has {source.shape[1]} columns and target_emb {target.shape[1]}: "
                "both sides must come from the same encoder space"
            )
        if groups is not None:
            groups = _check_groups(groups, len(source), self.center)
        self.__dict__.pop("accumulator_", None)  # a new fit starts new sums
        fmap = make_feature_map(self.kernel, sigma=self.sigma, rff_dim=self.rff_dim, seed=self.seed)
        # One draw of random features, shared by both sides (sigma's median heuristic sees both).
        fmap.fit(source if self.kernel == "cosine" else np.vstack([source, target]))
        n, D = len(source), fmap.n_output_features_
        method = choose_method(self.method, n, D)
        if method == "primal" and groups is None:
            # Gamma and R need no C_target (with_yy=False); row blocks, as in sce_score
            acc, max_norm = accumulate_features(row_blocks(source, target), fmap, kernel=self.kernel,
                                                names=("source_emb", "target_emb"),
                                                accumulator=CovarianceAccumulator(with_yy=False))
            return self._fit_covariances(acc.covariances(center=self.center), fmap, ridge, max_norm,
                                         source.shape[1])
        phi_s, phi_t = fmap.transform(source), fmap.transform(target)
        source_mean = target_mean = None
        if self.center:
            source_mean, target_mean = phi_s.mean(axis=0), phi_t.mean(axis=0)
            if groups is None:
                phi_s, phi_t = phi_s - source_mean, phi_t - target_mean
            else:
                phi_s, phi_t = group_centred(phi_s, groups), group_centred(phi_t, groups)
        phi_s = phi_s.astype(np.float64, copy=False)
        phi_t = phi_t.astype(np.float64, copy=False)
        if method == "primal":  # groups given: the covariances of the group-centred features
            R, gamma = explained_covariance(phi_s.T @ phi_s / n, phi_s.T @ phi_t / n, ridge, what="C_source",
                                            with_gamma=True)
            self._check_strength_bound(phi_s, gamma)
            return self._set_fit(fmap, gamma, R, n, source.shape[1], "primal", source_mean, target_mean)
        # Push-through identity: (Phi_S'Phi_S + n eps I)^-1 Phi_S' = Phi_S' (K_S + n eps I)^-1.
        K_S = symmetric_part(phi_s @ phi_s.T)
        A = linalg.cho_solve(ridge_cholesky(K_S, n * ridge, "K_source"), phi_t, check_finite=False)
        gamma = phi_s.T @ A
        R = symmetric_part(phi_t.T @ (K_S @ A)) / n
        self._check_strength_bound(phi_s, gamma)
        return self._set_fit(fmap, gamma, R, n, source.shape[1], "dual", source_mean, target_mean)

    def fit_batches(self, batches) -> "SchurCorrector":
        """`fit` on pairs given as an iterable of (source_emb, target_emb) batches, in O(D^2) memory.

        The same Gamma as `fit` on the stacked rows (up to rounding), always in the primal
        form; the gaussian kernel needs ``sigma`` (its median heuristic needs every row).
        """
        ridge = self._check_params()
        if self.method == "dual":
            raise InputError("method 'dual' needs every row in memory; fit_batches works in the primal form")
        self.__dict__.pop("accumulator_", None)
        fmap, _ = streaming_feature_map(self.kernel, self.sigma, self.rff_dim, self.seed)
        acc, max_norm = accumulate_features(batches, fmap, kernel=self.kernel, names=("source_emb", "target_emb"),
                                            accumulator=CovarianceAccumulator(with_yy=False))
        return self._fit_covariances(acc.covariances(center=self.center), fmap, ridge, max_norm,
                                     fmap.n_features_in_)

    def partial_fit(self, source_emb, target_emb) -> "SchurCorrector":
        """Add a batch of pairs to the running sums and refit on every pair seen so far
        (scikit-learn's incremental convention; `fit` or `fit_batches` start over).

        Each call solves the D x D problem again; to fit once over many batches use
        `fit_batches`. The running sums are kept in ``accumulator_`` (not saved by `save`).
        """
        ridge = self._check_params()
        if self.method == "dual":
            raise InputError("method 'dual' needs every row in memory; partial_fit works in the primal form")
        if hasattr(self, "gamma_") and not hasattr(self, "accumulator_"):
            raise InputError("this SchurCorrector was fitted without running sums (fit or load): "
                             "partial_fit cannot continue it; fit again with partial_fit or fit_batches")
        if not hasattr(self, "accumulator_"):
            self._partial_map, _ = streaming_feature_map(self.kernel, self.sigma, self.rff_dim, self.seed)
            self._partial_norm = 0.0
            acc = CovarianceAccumulator(with_yy=False)
        else:
            acc = self.accumulator_
        fmap = self._partial_map
        # Sums on a copy: a batch that fails (bad rows, a singular C_source) leaves the fit as it was.
        trial = CovarianceAccumulator(with_yy=False).merge(acc)
        trial, batch_norm = accumulate_features([(source_emb, target_emb)], fmap, kernel=self.kernel,
                                                names=("source_emb", "target_emb"), accumulator=trial)
        max_norm = max(self._partial_norm, batch_norm)
        self._fit_covariances(trial.covariances(center=self.center), fmap, ridge, max_norm, fmap.n_features_in_)
        self.accumulator_, self._partial_norm = trial, max_norm
        return self

    def _check_params(self) -> float:
        check_choice(self.direction, "direction", DIRECTIONS)
        check_choice(self.kernel, "kernel", ("cosine", "gaussian"))
        ridge = check_ridge(self.ridge)
        self._check_strength()
        return ridge

    def _fit_covariances(self, cov: Covariances, fmap, ridge: float, max_norm: float, n_features_in: int):
        """The primal fit from the source (X) / target (Y) feature covariances."""
        R, gamma = explained_covariance(cov.C_XX, cov.C_XY, ridge, what="C_source", with_gamma=True)
        source_mean = target_mean = None
        if cov.centered:
            source_mean, target_mean = cov.mean_x, cov.mean_y
            max_norm = max_norm + float(np.linalg.norm(source_mean))  # ||phi - m|| <= ||phi|| + ||m||
        self._check_reach(max_norm, gamma)
        return self._set_fit(fmap, gamma, R, cov.n, n_features_in, "primal", source_mean, target_mean)

    def _set_fit(self, fmap, gamma, R, n, n_features_in, method, source_mean, target_mean):
        self.feature_map_ = fmap
        self.gamma_ = gamma
        self.n_samples_ = n
        self.n_features_in_ = n_features_in
        self.method_ = method
        self.source_mean_, self.target_mean_ = source_mean, target_mean
        if self.kernel == "cosine":
            lam, vec = np.linalg.eigh(R)  # LAPACK syevd, ascending
            self.explained_eigvals_ = np.clip(lam[::-1], 0.0, None)
            self.explained_eigvecs_ = np.ascontiguousarray(vec[:, ::-1])
        else:
            self.explained_eigvals_ = None
            self.explained_eigvecs_ = None
        return self

    # -- using the fit -----------------------------------------------------------------------
    def correct(self, source_emb, target_emb) -> np.ndarray:
        """Corrected target features phi(target) - strength * Gamma' phi(source), row by row.

        When centred, phi(source) - source_mean_ takes the place of phi(source).

        Not renormalised: with the cosine kernel, divide by the row norms before comparing
        with text queries.
        """
        self._check_fitted()
        self._check_strength()
        source, target = as_pair(source_emb, target_emb, "source_emb", "target_emb")
        for name, arr in (("source_emb", source), ("target_emb", target)):
            if arr.shape[1] != self.n_features_in_:
                raise InputError(
                    f"{name} has {arr.shape[1]} columns but the corrector was fitted on {self.n_features_in_}"
                )
        return self.feature_map_.transform(target) - self.explained(source)

    def explained(self, source_emb) -> np.ndarray:
        """strength * Gamma' phi(source), row by row: what `correct` subtracts from the target's
        features (phi(source) - source_mean_ when centred). Any number of rows, one included."""
        self._check_fitted()
        self._check_strength()
        phi_s = self.feature_map_.transform(source_emb)
        if self.source_mean_ is not None:
            phi_s = phi_s - self.source_mean_
        self._check_strength_bound(phi_s, self.gamma_)
        return float(self.strength) * (phi_s @ self.gamma_)

    def n_components_for_energy(self, energy: float) -> int:
        """Smallest k whose top-k eigenvalues of R hold at least `energy` of tr R."""
        self._check_projection_available()
        energy = float(energy)
        if not 0 < energy <= 1:
            raise InputError(f"energy must be in (0, 1], got {energy}")
        lam = self.explained_eigvals_
        total = lam.sum()
        if total <= 0:
            raise InputError("the source explains nothing of the target (tr R = 0): no concept to project")
        share = np.cumsum(lam) / total
        return int(min(np.searchsorted(share, energy - 1e-12) + 1, self.n_directions()))

    def n_directions(self) -> int:
        """How many directions the concept has: the eigenvalues of R above rounding noise.

        A concept set with m distinct prompts explains at most m directions (m - 1 when
        centred); the other eigenvectors of R are arbitrary directions of a zero eigenvalue.
        """
        self._check_projection_available()
        lam = self.explained_eigvals_
        if lam.size == 0 or lam[0] <= 0:
            return 0
        # R is formed in float32 when the embeddings are float32: noise ~ max(D, n) * eps32 * lam_max.
        tol = lam[0] * max(lam.size, int(self.n_samples_)) * float(np.finfo(np.float32).eps)
        return int(np.count_nonzero(lam > tol))

    def projection(self, n_components: int | None = None, energy: float | None = None,
                   mode: str = "nullify") -> np.ndarray:
        """The d x d projection: "nullify" = I - U_k U_k', "focus" = U_k U_k'.

        U_k holds the top-k eigenvectors of R; k is `n_components` (at most `n_directions()`,
        see `check_n_components`), or the smallest count holding `energy` of tr R (default
        DEFAULT_ENERGY = 0.99 when neither is given). Cosine kernel only.
        """
        self._check_projection_available()
        check_choice(mode, "mode", ("nullify", "focus"))
        if n_components is not None and energy is not None:
            raise InputError("give n_components or energy, not both")
        if n_components is None:
            k = self.n_components_for_energy(DEFAULT_ENERGY if energy is None else energy)
        else:
            k = self.check_n_components(n_components, mode)
        U = self.explained_eigvecs_[:, :k]
        focus = U @ U.T
        return focus if mode == "focus" else np.eye(U.shape[0]) - focus

    def check_n_components(self, n_components, mode: str = "nullify") -> int:
        """``n_components`` as an int between 1 and the concept's number of directions.

        More would project arbitrary directions of a zero eigenvalue (and removing all d of
        them leaves every vector zero, so every score would be 0).
        """
        self._check_projection_available()
        try:
            k = int(n_components)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"n_components must be a whole number, got {n_components!r}") from None
        if k != n_components:
            raise InputError(f"n_components must be a whole number, got {n_components!r}")
        r = self.n_directions()
        d = self.explained_eigvecs_.shape[0]
        if r == 0:
            raise InputError("the source explains nothing of the target (tr R = 0): no concept to project")
        if not 1 <= k <= r:
            raise InputError(
                f"n_components must be between 1 and {r}, got {k}: the concept has {r} direction(s) "
                f"(from {self.n_samples_} pairs{', centred' if self.center else ''}; {d} dimensions)"
            )
        if k == d and mode == "nullify":
            raise InputError(f"n_components={k} removes all {d} dimensions: nothing would be left to search")
        return k

    # -- persistence -------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write everything needed to reproduce the fit (random features included), atomically."""
        self._check_fitted()
        path = Path(path)
        meta = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "params": self.get_params(),
            "n_samples": self.n_samples_,
            "n_features_in": self.n_features_in_,
            "method": self.method_,
            "feature_map": self.feature_map_.get_state(),
        }
        arrays = {"gamma": self.gamma_}
        if self.explained_eigvecs_ is not None:
            arrays["explained_eigvals"] = self.explained_eigvals_
            arrays["explained_eigvecs"] = self.explained_eigvecs_
        if self.source_mean_ is not None:
            arrays["source_mean"] = self.source_mean_
            arrays["target_mean"] = self.target_mean_
        if isinstance(self.feature_map_, RandomFourierFeatures):
            arrays["rff_frequencies"] = self.feature_map_.frequencies_
        return write_npz(path, meta, arrays)

    @classmethod
    def load(cls, path) -> "SchurCorrector":
        meta, arrays = read_npz(path, "SchurCorrector")
        check_format(path, meta, FILE_FORMAT, FILE_VERSION, "SchurCorrector")
        obj = cls(**meta["params"])
        fm_state = meta["feature_map"]
        fm_cls = CosineFeatures if fm_state["kind"] == "cosine" else RandomFourierFeatures
        obj.feature_map_ = fm_cls.from_state(fm_state, arrays)
        obj.gamma_ = arrays["gamma"]
        obj.n_samples_ = int(meta["n_samples"])
        obj.n_features_in_ = int(meta["n_features_in"])
        obj.method_ = meta["method"]
        obj.explained_eigvals_ = arrays.get("explained_eigvals")
        obj.explained_eigvecs_ = arrays.get("explained_eigvecs")
        obj.source_mean_ = arrays.get("source_mean")
        obj.target_mean_ = arrays.get("target_mean")
        if obj.center and obj.source_mean_ is None:
            raise InputError(f"{path} is a centred SchurCorrector without its means; fit the correction again")
        return obj

    # -- scikit-learn's estimator conventions (sklearn.base.clone works; sklearn is not imported)
    @classmethod
    def _get_param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters (``deep`` is accepted for scikit-learn: none is an estimator)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> "SchurCorrector":
        """Set constructor parameters (checked when used, as in scikit-learn); returns self."""
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise InputError(f"invalid parameter {name!r} for SchurCorrector; valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"SchurCorrector({args})"

    # -- checks ------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "gamma_"):
            raise ValueError("this SchurCorrector is not fitted yet: call fit(source_emb, target_emb) first")

    def _check_strength(self) -> None:
        s = float(self.strength)
        if not np.isfinite(s):
            raise InputError(f"strength must be a finite number, got {self.strength}")

    def _check_strength_bound(self, phi_s: np.ndarray, gamma: np.ndarray) -> None:
        """InputError when strength * Gamma' phi(source) could exceed MAX_CORRECTION_NORM."""
        if len(phi_s):
            self._check_reach(_max_row_norm(phi_s), gamma)

    def _check_reach(self, max_norm: float, gamma: np.ndarray) -> None:
        """The same, for source rows of norm at most ``max_norm``."""
        s = abs(float(self.strength))
        # ||Gamma' x|| <= ||Gamma||_F ||x||: an upper bound that costs O(D^2), not a product.
        reach = float(np.linalg.norm(gamma)) * float(max_norm)
        if reach > 0 and s * reach > MAX_CORRECTION_NORM:
            limit = MAX_CORRECTION_NORM / reach
            step = 10.0 ** (np.floor(np.log10(limit)) - 2)  # three significant digits, rounded down
            raise InputError(
                f"strength {self.strength:g} is too large: the corrected features would overflow; "
                f"use |strength| <= {np.floor(limit / step) * step:.3g} (1 removes the concept)"
            )

    def _check_projection_available(self) -> None:
        self._check_fitted()
        if self.kernel != "cosine":
            raise InputError(
                f"projection needs the cosine kernel (this corrector uses {self.kernel!r}): "
                "its corrected features live in the random-feature space, not the encoder's"
            )


def _max_row_norm(phi: np.ndarray) -> float:
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", phi, phi)))) if len(phi) else 0.0

