"""Evaluation metrics for text-to-image outputs: pure functions from features to numbers.

Feature extraction, caching and file handling live elsewhere (`indexing`); every function
here takes arrays (embeddings, class probabilities or decoded images) and returns a number
or a small result dataclass. Inputs are validated up front and an InputError (from
`sce_correct.errors`, also a ValueError) names the argument and what is wrong with it (row
counts that differ, too few samples, NaN, or embedding widths that differ, which almost
always means two different encoders).

- `clip_score`: CLIPScore, w * max(cos(image, text), 0), per pair and mean.
- `frechet_distance`, `frechet_distance_from_features`: Fréchet distance between Gaussian fits.
- `kernel_inception_distance`: KID, unbiased polynomial-kernel MMD^2 over random subsets.
- `cmmd`: Gaussian-kernel MMD^2 of unit-normalised embeddings (CMMD).
- `vendi_score_from_features`, `rke_from_features`: cosine-kernel diversity of one set.
- `directional_similarity`: CLIP directional similarity of edit pairs.
- `inception_score_from_probs`: Inception-Score-style score from classifier probabilities.
- `psnr`, `ssim`: pixel metrics for paired images (scikit-image, imported on first use).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.special import rel_entr

from sce_correct import rke_score, vendi_score
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "ClipScoreResult", "DirectionalSimilarityResult", "KIDResult", "InceptionScoreResult",
    "clip_score", "frechet_distance", "frechet_distance_from_features",
    "kernel_inception_distance", "cmmd", "vendi_score_from_features", "rke_from_features",
    "directional_similarity", "inception_score_from_probs", "psnr", "ssim",
]

# Rows of the first operand per block when summing a Gaussian kernel matrix, so that CMMD on
# tens of thousands of embeddings never holds an n x n matrix (a module constant so tests can
# force several blocks on small inputs).
_KERNEL_BLOCK_ROWS = 2048


# ---------------------------------------------------------------------------------------------
# Results that cross module boundaries


@dataclass(frozen=True, eq=False)
class ClipScoreResult:
    """CLIPScore per (image, prompt) pair, its mean, and the weight w used."""

    per_pair: np.ndarray
    mean: float
    w: float

    def to_dict(self) -> dict:
        return {"per_pair": [float(v) for v in self.per_pair], "mean": self.mean, "w": self.w}


@dataclass(frozen=True, eq=False)
class DirectionalSimilarityResult:
    """CLIP directional similarity per edit pair and its mean."""

    per_pair: np.ndarray
    mean: float

    def to_dict(self) -> dict:
        return {"per_pair": [float(v) for v in self.per_pair], "mean": self.mean}


@dataclass(frozen=True)
class KIDResult:
    """KID: mean and standard deviation (ddof=0) of the unbiased MMD^2 over the subsets."""

    mean: float
    std: float
    n_subsets: int
    subset_size: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n_subsets": self.n_subsets,
                "subset_size": self.subset_size}


@dataclass(frozen=True)
class InceptionScoreResult:
    """Inception-Score-style score: mean and standard deviation (ddof=0) over the splits.

    classifier names the network that produced the probabilities; scores from different
    classifiers (for example not Inception-v3) are not comparable.
    """

    mean: float
    std: float
    n_splits: int
    classifier: str | None = None

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n_splits": self.n_splits,
                "classifier": self.classifier}


# ---------------------------------------------------------------------------------------------
# Input validation


def _as_features(x, name: str, *, min_rows: int = 1, why: str = "") -> np.ndarray:
    """Return `x` as a finite float64 (n, d) array, or raise an InputError (a ValueError) naming `name`."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a numeric (n, d) array: {exc}") from None
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D (n, d) array, got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise InputError(f"{name} has no feature columns (shape {arr.shape})")
    if arr.shape[0] < min_rows:
        reason = f" {why}" if why else ""
        raise InputError(f"{name} needs at least {min_rows} rows{reason}, got {arr.shape[0]}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise InputError(f"{name} contains NaN or inf in {bad.size} row(s), first at row {bad[0]}")
    return arr


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"{name_a} has {a.shape[1]} dimensions but {name_b} has {b.shape[1]}: "
            "mixed encoders? Both must come from the same encoder."
        )


def _check_same_rows(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise InputError(
            f"{name_a} and {name_b} must pair up row by row, got {a.shape[0]} and {b.shape[0]} rows"
        )


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise InputError(
            f"{name} has {zero.size} all-zero row(s) (first at row {zero[0]}), "
            "which have no direction to normalise"
        )
    return x / norms


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(value, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Text-image agreement


def clip_score(image_emb, text_emb, w: float = 2.5) -> ClipScoreResult:
    """CLIPScore of paired embeddings: w * max(cos(image_i, text_i), 0) for each row i.

    Row i of `image_emb` and of `text_emb` are one (generated image, prompt) pair from the
    same encoder. w = 2.5 is the weight of Hessel et al. (2021), which stretches typical
    CLIP cosines (about 0.2-0.4) towards [0, 1].
    """
    image = _as_features(image_emb, "image_emb")
    text = _as_features(text_emb, "text_emb")
    _check_same_rows(image, text, "image_emb", "text_emb")
    _check_same_dim(image, text, "image_emb", "text_emb")
    w = _positive_float(w, "w")
    cosines = np.einsum("ij,ij->i", _unit_rows(image, "image_emb"), _unit_rows(text, "text_emb"))
    per_pair = w * np.maximum(cosines, 0.0)
    return ClipScoreResult(per_pair=per_pair, mean=float(per_pair.mean()), w=w)


def directional_similarity(src_img, edit_img, src_txt, edit_txt) -> DirectionalSimilarityResult:
    """CLIP directional similarity of edit pairs: cos(edit_img - src_img, edit_txt - src_txt).

    Each embedding is unit-normalised first (as CLIP similarities are defined on the sphere),
    then the image change and the caption change are compared by cosine, one value per row.
    A pair whose image or caption did not change has no direction; it scores 0 (the edit
    moved nothing along the caption change) and a warning is logged with the count.
    """
    names = ("src_img", "edit_img", "src_txt", "edit_txt")
    inputs = (src_img, edit_img, src_txt, edit_txt)
    arrays = [_as_features(x, name) for x, name in zip(inputs, names)]
    for arr, name in zip(arrays[1:], names[1:]):
        _check_same_rows(arrays[0], arr, names[0], name)
        _check_same_dim(arrays[0], arr, names[0], name)
    src_i, edit_i, src_t, edit_t = (_unit_rows(arr, name) for arr, name in zip(arrays, names))
    image_change = edit_i - src_i
    text_change = edit_t - src_t
    norm_product = np.linalg.norm(image_change, axis=1) * np.linalg.norm(text_change, axis=1)
    # Identical unit vectors subtract to exactly zero; anything below this is round-off.
    no_direction = norm_product <= 1e-12
    if no_direction.any():
        logger.warning("directional_similarity: %d of %d pairs have an unchanged image or "
                       "caption; they score 0", int(no_direction.sum()), norm_product.size)
    dots = np.einsum("ij,ij->i", image_change, text_change)
    per_pair = np.where(no_direction, 0.0, dots / np.where(no_direction, 1.0, norm_product))
    return DirectionalSimilarityResult(per_pair=per_pair, mean=float(per_pair.mean()))


# ---------------------------------------------------------------------------------------------
# Distribution distances


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The matrix square root is `scipy.linalg.sqrtm`. Singular or near-singular products
    (fewer samples than dimensions) are handled the way the reference implementations
    (pytorch-fid, clean-fid) do: if the square root is not finite, it is recomputed on
    (sigma1 + eps I)(sigma2 + eps I) and a warning is logged; the trace terms keep the
    original covariances. Round-off can leave a small imaginary part on the square root; it
    is dropped when the imaginary part of the diagonal is below 1e-3, otherwise an InputError
    is raised. The result is not clipped, so identical inputs may give a tiny negative.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if mu.ndim != 1:
            raise InputError(f"{name} must be a 1-D mean vector, got shape {mu.shape}")
    for name, sigma, mu in (("sigma1", sigma1, mu1), ("sigma2", sigma2, mu2)):
        if sigma.ndim != 2 or sigma.shape != (mu.size, mu.size):
            raise InputError(f"{name} must be a ({mu.size}, {mu.size}) covariance matching its "
                             f"mean, got shape {sigma.shape}")
    if mu1.size != mu2.size:
        raise InputError(f"the two Gaussians have {mu1.size} and {mu2.size} dimensions: "
                         "mixed encoders? Both must come from the same encoder.")
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise InputError(f"{name} contains NaN or inf")
    eps = float(eps)
    if not np.isfinite(eps) or eps <= 0:
        raise InputError(f"eps must be a finite number > 0, got {eps}")

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("frechet_distance: the covariance product is singular; adding %g to "
                       "the diagonal of both covariances for the square root", eps)
        offset = eps * np.eye(mu1.size)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > 1e-3:
            raise InputError(f"frechet_distance: the square root of the covariance product has "
                             f"an imaginary diagonal part of {largest:.3g}; the covariances are "
                             "not valid (positive semi-definite) or badly conditioned")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(feats_a, feats_b, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits (mean, unbiased covariance) of two feature sets.

    Rows are samples. With fewer samples than dimensions the covariances are singular; the
    distance is still defined (see `frechet_distance`) but strongly biased, so a warning is
    logged.
    """
    why = "to estimate a covariance"
    a = _as_features(feats_a, "feats_a", min_rows=2, why=why)
    b = _as_features(feats_b, "feats_b", min_rows=2, why=why)
    _check_same_dim(a, b, "feats_a", "feats_b")
    d = a.shape[1]
    if min(a.shape[0], b.shape[0]) <= d:
        logger.warning("frechet_distance_from_features: %d and %d samples for %d dimensions; "
                       "the covariances are singular and the distance is strongly biased",
                       a.shape[0], b.shape[0], d)
    return frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False),
                            b.mean(axis=0), np.cov(b, rowvar=False), eps=eps)


def _unbiased_mmd2(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices of two equal-size samples (diagonals excluded)."""
    m = k_aa.shape[0]
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2.0 * k_ab.mean())


def kernel_inception_distance(feats_a, feats_b, *, n_subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 0) -> KIDResult:
    """KID (Bińkowski et al., 2018): unbiased MMD^2 with a polynomial kernel, over subsets.

    k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/d by default. Each of `n_subsets` rounds
    draws m = min(subset_size, n_a, n_b) rows without replacement from each set (a
    `numpy.random.default_rng(seed)` generator, so results are reproducible) and computes

        MMD^2_u = sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (m(m-1))
                  - 2 sum_{i,j} k(a_i, b_j) / m^2.

    Returns the mean and the standard deviation (ddof=0) of the rounds, as torch-fidelity
    reports them. MMD^2_u can be slightly negative when the sets match.
    """
    a = _as_features(feats_a, "feats_a", min_rows=2, why="for an unbiased MMD")
    b = _as_features(feats_b, "feats_b", min_rows=2, why="for an unbiased MMD")
    _check_same_dim(a, b, "feats_a", "feats_b")
    n_subsets = _positive_int(n_subsets, "n_subsets")
    subset_size = _positive_int(subset_size, "subset_size", minimum=2)
    degree = _positive_int(degree, "degree")
    gamma = 1.0 / a.shape[1] if gamma is None else _positive_float(gamma, "gamma")
    coef0 = float(coef0)
    if not np.isfinite(coef0):
        raise InputError(f"coef0 must be finite, got {coef0}")

    m = min(subset_size, a.shape[0], b.shape[0])
    if m < subset_size:
        logger.info("kernel_inception_distance: subset size capped at %d (sets of %d and %d)",
                    m, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(n_subsets)
    for k in range(n_subsets):
        x = a[rng.choice(a.shape[0], size=m, replace=False)]
        y = b[rng.choice(b.shape[0], size=m, replace=False)]
        values[k] = _unbiased_mmd2((gamma * (x @ x.T) + coef0) ** degree,
                                   (gamma * (y @ y.T) + coef0) ** degree,
                                   (gamma * (x @ y.T) + coef0) ** degree)
    return KIDResult(mean=float(values.mean()), std=float(values.std()),
                     n_subsets=n_subsets, subset_size=m)


def _gaussian_kernel_sums(x: np.ndarray, y: np.ndarray, gamma: float) -> tuple[float, float]:
    """Sum of exp(-gamma ||x_i - y_j||^2) over all (i, j), and over i == j when x is y.

    Works in row blocks of x so memory stays O(block * len(y)).
    """
    y_sq = np.einsum("ij,ij->i", y, y)
    total = 0.0
    diagonal = 0.0
    for start in range(0, x.shape[0], _KERNEL_BLOCK_ROWS):
        block = x[start:start + _KERNEL_BLOCK_ROWS]
        block_sq = np.einsum("ij,ij->i", block, block)
        # The expanded form can go a hair below zero by round-off; a distance cannot.
        sq_dist = np.maximum(block_sq[:, None] + y_sq[None, :] - 2.0 * (block @ y.T), 0.0)
        kernel = np.exp(-gamma * sq_dist)
        total += float(kernel.sum())
        if x is y:
            diagonal += float(np.trace(kernel[:, start:start + block.shape[0]]))
    return total, diagonal


def cmmd(feats_a, feats_b, *, sigma: float = 10.0, scale: float = 1000.0,
         unbiased: bool = True) -> float:
    """CMMD (Jayasumana et al., 2024): Gaussian-kernel MMD^2 of unit-normalised embeddings.

    Each row is divided by its norm (the paper uses normalised CLIP embeddings), then with
    k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), sigma = 10 and scale = 1000 as in the paper:

    unbiased=True (default; the estimator the paper writes down):
        scale * [ sum_{i!=j} k(a_i, a_j) / (n_a(n_a-1)) + sum_{i!=j} k(b_i, b_j) / (n_b(n_b-1))
                  - 2 sum_{i,j} k(a_i, b_j) / (n_a n_b) ]
    unbiased=False (what the released google-research `cmmd/distance.py` computes): the same
        with the within-set means taken over all n^2 entries, diagonals included.

    The two differ by about scale * (1 - mean off-diagonal k) / n per set: small for
    thousands of images, noticeable for a few dozen. All pairs are used, no subsets; the
    kernel sums run in row blocks so memory stays linear in the set sizes.
    """
    a = _as_features(feats_a, "feats_a", min_rows=2, why="for an MMD")
    b = _as_features(feats_b, "feats_b", min_rows=2, why="for an MMD")
    _check_same_dim(a, b, "feats_a", "feats_b")
    sigma = _positive_float(sigma, "sigma")
    scale = _positive_float(scale, "scale")
    a = _unit_rows(a, "feats_a")
    b = _unit_rows(b, "feats_b")
    gamma = 1.0 / (2.0 * sigma * sigma)

    n_a, n_b = a.shape[0], b.shape[0]
    sum_aa, diag_aa = _gaussian_kernel_sums(a, a, gamma)
    sum_bb, diag_bb = _gaussian_kernel_sums(b, b, gamma)
    sum_ab, _ = _gaussian_kernel_sums(a, b, gamma)
    if unbiased:
        within = (sum_aa - diag_aa) / (n_a * (n_a - 1)) + (sum_bb - diag_bb) / (n_b * (n_b - 1))
    else:
        within = sum_aa / n_a**2 + sum_bb / n_b**2
    return float(scale * (within - 2.0 * sum_ab / (n_a * n_b)))


# ---------------------------------------------------------------------------------------------
# Diversity of one set


def _cosine_kernel_eigenvalues(feats, name: str) -> np.ndarray:
    """Eigenvalues of K/n, K_ij = cos(f_i, f_j), from the smaller of the n x n or d x d form."""
    x = _unit_rows(_as_features(feats, name), name)
    n, d = x.shape
    # Phi Phi'/n and Phi'Phi/n share their nonzero eigenvalues; decompose the smaller one.
    gram = (x @ x.T if n <= d else x.T @ x) / n
    return np.linalg.eigvalsh(gram)


def vendi_score_from_features(feats) -> float:
    """Vendi score of one set with the cosine kernel: exp(entropy of eig(K/n)).

    Rows are unit-normalised; 1 for identical rows, n for n orthogonal rows.
    """
    return vendi_score(_cosine_kernel_eigenvalues(feats, "feats"))


def rke_from_features(feats) -> float:
    """RKE mode count of one set with the cosine kernel: 1 / sum eig(K/n)^2 (order-2 Vendi)."""
    return rke_score(_cosine_kernel_eigenvalues(feats, "feats"))


# ---------------------------------------------------------------------------------------------
# Classifier-based score


def inception_score_from_probs(probs, n_splits: int = 10, *,
                               classifier: str | None = None) -> InceptionScoreResult:
    """Inception-Score-style score from class probabilities p(y|x), one row per image.

    The rows are cut into `n_splits` consecutive parts of (nearly) equal size, as in the
    original implementation; for each part IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the
    mean of the part's rows. Returns the mean and standard deviation (ddof=0) over parts.
    1 is the minimum (every image gets the same distribution); k is reached by confident
    predictions spread evenly over k classes. Pass `classifier` to record which network
    produced the probabilities: values are only comparable for the same classifier.
    """
    p = _as_features(probs, "probs", min_rows=1)
    n_splits = _positive_int(n_splits, "n_splits")
    if p.shape[0] < n_splits:
        raise InputError(f"probs has {p.shape[0]} rows, fewer than n_splits={n_splits}; "
                         "need at least one image per split")
    if (p < 0).any():
        raise InputError("probs has negative entries; pass softmax probabilities, not logits")
    row_sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(row_sums - 1.0) > 1e-3)
    if off.size:
        raise InputError(f"probs rows must sum to 1 (softmax probabilities); {off.size} row(s) "
                         f"do not, first at row {off[0]} with sum {row_sums[off[0]]:.4g}")
    n = p.shape[0]
    scores = np.empty(n_splits)
    for k in range(n_splits):
        part = p[k * n // n_splits:(k + 1) * n // n_splits]
        marginal = part.mean(axis=0, keepdims=True)
        # rel_entr gives p log(p/q) with 0 log 0 = 0, so one-hot rows are handled exactly.
        scores[k] = np.exp(rel_entr(part, marginal).sum(axis=1).mean())
    return InceptionScoreResult(mean=float(scores.mean()), std=float(scores.std()),
                                n_splits=n_splits, classifier=classifier)


# ---------------------------------------------------------------------------------------------
# Pixel metrics for paired images


def _image_pair(img_a, img_b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(img_a)
    b = np.asarray(img_b)
    if a.shape != b.shape:
        raise InputError(f"paired images must have the same shape, got {a.shape} and {b.shape}; "
                         "resize one of them first")
    if a.ndim not in (2, 3):
        raise InputError(f"images must be H x W or H x W x C arrays, got shape {a.shape}")
    for name, img in (("img_a", a), ("img_b", b)):
        if not np.issubdtype(img.dtype, np.number):
            raise InputError(f"{name} must be a numeric array, got dtype {img.dtype}")
        if not np.isfinite(img).all():
            raise InputError(f"{name} contains NaN or inf")
    return a, b


def psnr(img_a, img_b, data_range: float = 255) -> float:
    """Peak signal-to-noise ratio, 10 log10(data_range^2 / MSE), in dB (inf for equal images).

    Paired H x W x C (or H x W) arrays of the same shape, by
    `skimage.metrics.peak_signal_noise_ratio`.
    """
    a, b = _image_pair(img_a, img_b)
    data_range = _positive_float(data_range, "data_range")
    if np.array_equal(a, b):
        return float("inf")  # MSE is 0; answer directly rather than divide by zero
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64),
                                         data_range=data_range))


def ssim(img_a, img_b, data_range: float = 255) -> float:
    """Mean structural similarity (Wang et al., 2004) of two paired images, 1.0 when equal.

    `skimage.metrics.structural_similarity` with the settings of Wang et al.: an 11 x 11
    Gaussian window with sigma 1.5 and population statistics; colour channels (last axis of
    H x W x C) are scored separately and averaged. Both sides must be at least 11 pixels.
    """
    a, b = _image_pair(img_a, img_b)
    data_range = _positive_float(data_range, "data_range")
    if min(a.shape[:2]) < 11:
        raise InputError(f"ssim needs images of at least 11 x 11 pixels for its window, got "
                         f"{a.shape[0]} x {a.shape[1]}")
    from skimage.metrics import structural_similarity

    return float(structural_similarity(
        a.astype(np.float64), b.astype(np.float64), data_range=data_range,
        channel_axis=-1 if a.ndim == 3 else None,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    ))
