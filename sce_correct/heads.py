"""HeadAblation: remove a concept by mean-ablating the attention heads that carry it (DESIGN.md 7).

A ViT's image embedding (before normalisation) is a sum of direct terms: the stem, one per
MLP and one per (layer, head) (``indexing.encoders.decomposition.decompose``). Mean-ablating a
head replaces its term by its mean over a reference set of images:

    x~ = x - sum_{(l,h) in S} (c_{l,h}(x) - mean_{l,h}),

so what that head writes differently from image to image is gone, and the rest is kept.

Which heads: the concept is given by its prompts' text embeddings T (m x d, in the image
embedding space of a CLIP-like model), e.g. "light skin tone", ..., "dark skin tone". The
concept's directions are an orthonormal basis U of the centred unit prompts (the span of
their differences, rank <= m - 1). Over the concept's images, a head's *concept variance* is
the variance of its terms along U, ``tr(U' Cov(c_{l,h}) U)``; heads are ranked by it and the
top ones ablated: ``n_heads`` of them, or the fewest whose concept variance reaches ``share``
of all heads' together.

Pure numpy; the decomposition (torch) is the caller's.
"""
from __future__ import annotations

import numbers

import numpy as np

from ._checks import as_matrix
from .errors import InputError
from .saved import check_format, read_npz, write_npz

FILE_FORMAT = "sce_correct.HeadAblation"
FILE_VERSION = 1
DEFAULT_SHARE = 0.5
# Singular values of the centred unit prompts (scale 1) below this are rounding noise: prompts
# that are all the same text give no direction.
_RANK_TOL = 1e-6


def concept_basis(concept_embeddings) -> np.ndarray:
    """(d, r) orthonormal basis of the differences between the unit concept prompts."""
    T = as_matrix(concept_embeddings, "concept_embeddings").astype(np.float64)
    norms = np.linalg.norm(T, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError("a concept prompt embedding is zero: it has no direction")
    T = T / norms
    centred = T - T.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = s > _RANK_TOL
    if not keep.any():
        raise InputError("the concept prompts do not differ: they give no concept direction "
                         "(use prompts that vary in the concept, e.g. 'light skin tone', 'dark skin tone')")
    return vt[keep].T


def _head_terms(head_outputs, name: str) -> np.ndarray:
    C = np.asarray(head_outputs, dtype=np.float64)
    if C.ndim != 4:
        raise InputError(f"{name} must be (images, layers, heads, dim), got shape {C.shape}")
    if not np.isfinite(C).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return C


class HeadAblation:
    """Mean-ablation of the heads that carry a concept.

    Parameters
    ----------
    n_heads : int or None
        How many heads to ablate (the top ones by concept variance).
    share : float in (0, 1] or None
        Ablate the fewest heads whose concept variance adds up to this share of all heads'.
        Give one of ``n_heads`` and ``share``; with neither, ``share=DEFAULT_SHARE``.

    Fitted attributes: ``concept_basis_`` (d, r), ``concept_variance_`` and
    ``total_variance_`` (layers, heads), ``heads_`` ((K, 2) (layer, head) pairs, by concept
    variance, descending), ``means_`` ((K, d) the ablated heads' reference means),
    ``explained_share_`` (their share of the concept variance), ``n_features_in_``,
    ``n_layers_``, ``n_heads_in_``.
    """

    kernel = "heads"  # what the correction catalog lists beside the Schur kernels
    direction = "t2i"  # it changes image embeddings (the caller's label, as SchurCorrector's)

    def __init__(self, n_heads: int | None = None, share: float | None = None):
        self.n_heads = n_heads
        self.share = share

    def get_params(self, deep: bool = True) -> dict:
        return {"n_heads": self.n_heads, "share": self.share}

    def set_params(self, **params) -> "HeadAblation":
        for key, value in params.items():
            if key not in ("n_heads", "share"):
                raise InputError(f"HeadAblation has no parameter {key!r}")
            setattr(self, key, value)
        return self

    def check_params(self, n_layers: int, n_heads: int) -> None:
        if self.n_heads is not None and self.share is not None:
            raise InputError("give the number of heads or a share of the concept variance, not both")
        total = n_layers * n_heads
        if self.n_heads is not None:
            k = self.n_heads
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= total:
                raise InputError(f"the number of heads to ablate must be a whole number from 1 to {total} "
                                 f"(the tower has {n_layers} layers x {n_heads} heads), got {k!r}")
        if self.share is not None:
            s = self.share
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < s <= 1:
                raise InputError(f"the share of concept variance must be in (0, 1], got {s!r}")

    def fit(self, head_outputs, concept_embeddings, reference_means=None) -> "HeadAblation":
        """Rank the heads on ``head_outputs`` (n, layers, heads, d) of the concept's images.

        ``concept_embeddings``: (m, d) embeddings of the concept's prompts. ``reference_means``:
        (layers, heads, d) the heads' mean terms over a reference image set (what an ablated
        head writes instead); default their mean over ``head_outputs``.
        """
        C = _head_terms(head_outputs, "head_outputs")
        n, n_layers, n_heads, d = C.shape
        if n < 2:
            raise InputError(f"ranking heads needs the terms of at least 2 images, got {n}")
        self.check_params(n_layers, n_heads)
        U = concept_basis(concept_embeddings)
        if U.shape[0] != d:
            raise InputError(f"the concept embeddings are {U.shape[0]}-d, the head terms {d}-d")
        if reference_means is None:
            means = C.mean(axis=0)
        else:
            means = np.asarray(reference_means, dtype=np.float64)
            if means.shape != (n_layers, n_heads, d):
                raise InputError(f"reference_means has shape {means.shape}, expected {(n_layers, n_heads, d)}")
            if not np.isfinite(means).all():
                raise InputError("reference_means contains NaN or infinite values")
        centred = C - C.mean(axis=0)
        along = np.einsum("nlhd,dr->nlhr", centred, U)
        self.concept_variance_ = (along ** 2).sum(axis=-1).mean(axis=0)
        self.total_variance_ = (centred ** 2).sum(axis=-1).mean(axis=0)
        order = np.argsort(-self.concept_variance_, axis=None, kind="stable")
        ranked = self.concept_variance_.ravel()[order]
        grand = float(ranked.sum())
        if self.n_heads is not None:
            k = int(self.n_heads)
        else:
            target = (DEFAULT_SHARE if self.share is None else float(self.share)) * grand
            k = int(np.searchsorted(np.cumsum(ranked), target * (1 - 1e-12))) + 1
            k = min(max(k, 1), len(ranked))
        chosen = order[:k]
        self.heads_ = np.stack(np.unravel_index(chosen, (n_layers, n_heads)), axis=1).astype(np.int64)
        self.means_ = means[self.heads_[:, 0], self.heads_[:, 1]]
        self.explained_share_ = float(ranked[:k].sum() / grand) if grand > 0 else 0.0
        self.concept_basis_ = U
        self.n_features_in_ = d
        self.n_layers_, self.n_heads_in_ = n_layers, n_heads
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "heads_"):
            raise InputError("this HeadAblation is not fitted yet: call fit first")

    def transform(self, embeddings, head_outputs) -> np.ndarray:
        """``embeddings`` (n, d) (the unnormalised sums of the terms) with the chosen heads
        mean-ablated; ``head_outputs`` (n, layers, heads, d) are the same images' head terms."""
        self._check_fitted()
        x = as_matrix(embeddings, "embeddings")
        C = _head_terms(head_outputs, "head_outputs")
        if C.shape[1:] != (self.n_layers_, self.n_heads_in_, self.n_features_in_) or x.shape != (len(C), C.shape[3]):
            raise InputError(
                f"expected embeddings (n, {self.n_features_in_}) and head terms (n, {self.n_layers_}, "
                f"{self.n_heads_in_}, {self.n_features_in_}), got {x.shape} and {C.shape}")
        picked = C[:, self.heads_[:, 0], self.heads_[:, 1]]  # (n, K, d)
        return x - (picked - self.means_).sum(axis=1)

    @property
    def head_names(self) -> list[str]:
        """The ablated heads as "L<layer>H<head>", in rank order."""
        self._check_fitted()
        return [f"L{layer}H{head}" for layer, head in self.heads_.tolist()]

    # -- persistence -------------------------------------------------------------------------
    def save(self, path):
        self._check_fitted()
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "params": self.get_params(),
                "n_features_in": self.n_features_in_, "n_layers": self.n_layers_, "n_heads_in": self.n_heads_in_,
                "explained_share": self.explained_share_}
        arrays = {"heads": self.heads_, "means": self.means_, "concept_basis": self.concept_basis_,
                  "concept_variance": self.concept_variance_, "total_variance": self.total_variance_}
        return write_npz(path, meta, arrays)

    @classmethod
    def load(cls, path) -> "HeadAblation":
        meta, arrays = read_npz(path, "HeadAblation")
        check_format(path, meta, FILE_FORMAT, FILE_VERSION, "HeadAblation")
        try:
            obj = cls(**meta["params"])
            obj.heads_ = arrays["heads"].astype(np.int64)
            obj.means_ = arrays["means"]
            obj.concept_basis_ = arrays["concept_basis"]
            obj.concept_variance_ = arrays["concept_variance"]
            obj.total_variance_ = arrays["total_variance"]
            obj.n_features_in_ = int(meta["n_features_in"])
            obj.n_layers_, obj.n_heads_in_ = int(meta["n_layers"]), int(meta["n_heads_in"])
            obj.explained_share_ = float(meta["explained_share"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path} is not a complete saved HeadAblation ({exc})") from None
        L, H, d = obj.n_layers_, obj.n_heads_in_, obj.n_features_in_
        heads = obj.heads_
        if (heads.ndim != 2 or heads.shape[1] != 2 or obj.means_.shape != (len(heads), d)
                or obj.concept_variance_.shape != (L, H) or obj.concept_basis_.shape[0] != d
                or (len(heads) and (heads.min() < 0 or heads[:, 0].max() >= L or heads[:, 1].max() >= H))):
            raise InputError(f"{path} is not a consistent saved HeadAblation (its arrays disagree in shape)")
        return obj
