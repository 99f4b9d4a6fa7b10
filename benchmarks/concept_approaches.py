"""Approaches to removing a concept that `eval_concept_removal.py` measures beside the library's
default (issue 15), as pure functions of embedding arrays.

- :func:`iterative_projection`: fit, project, refit on the residual (INLP's loop, with prompts
  instead of labels) until the prompts explain less than ``tol`` of what they explained first.
- :func:`context_projection`: pairs that carry the concept in context (an item's caption
  "waving hand, dark skin tone" with its image, from the collection's metadata), centred
  within groups (the object), so that what varies between objects is not removed, only what
  varies with the concept inside each object.
- :func:`knn_smooth`: a correction conditional on each item's nearest items: after the
  projection, each vector is averaged with its near neighbours (cosine >= ``tau``), which on
  a corpus holding every tone of an object averages the tones away.
- :func:`local_projection`: a correction conditional on each item's nearest fitted object:
  after the global projection, each item also loses the top tone directions of the concept
  images of the fitted object it is closest to (the object-dependent part of the concept).
- :func:`offset_regression`: a nonlinear correction learned from the concept images: kernel
  ridge regression (Gaussian kernel) from an image to its offset from its object's mean
  (:func:`group_offsets` when the groups are known, :func:`partner_offsets` from the prompts
  alone), with items that lack the concept as anchors that keep their place (known, or
  :func:`weakest_concept_rows`); each item then loses its predicted offset. The offset's
  direction may depend on the object, which a projection of a fixed subspace cannot follow.
- :func:`group_means`: the reference a tone-blind ranking would reach (each toned item
  replaced by the mean of its object's toned items); it uses the labels, so it is not a method.
"""
from __future__ import annotations

import numpy as np

from retrieval.corrections import unit
from sce_correct import SchurCorrector
from sce_correct.corrector import DEFAULT_ENERGY, group_centred


def iterative_projection(source: np.ndarray, target: np.ndarray, *, energy: float = DEFAULT_ENERGY,
                         max_rounds: int = 5, tol: float = 0.01) -> tuple[np.ndarray, int]:
    """(P, rounds): the product of the nullify projections of each round (fitted on the targets
    projected by the rounds before), stopping when tr R falls below ``tol`` of the first round's."""
    P = np.eye(target.shape[1])
    first = None
    rounds = 0
    for _ in range(max_rounds):
        corrector = SchurCorrector(center=True).fit(source, unit(target) @ P)
        total = float(corrector.explained_eigvals_.sum())
        first = total if first is None else first
        if rounds and total < tol * first:
            break
        k = corrector.n_components_for_energy(energy)
        P = corrector.projection(n_components=k) @ P
        rounds += 1
    return P, rounds


def context_projection(source: np.ndarray, target: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """The nullify projection of the top-k directions of a fit centred within ``groups``."""
    return SchurCorrector(center=True).fit(source, target, groups=groups).projection(n_components=k)


def knn_smooth(Y: np.ndarray, *, tau: float = 0.85, neighbours: int = 8, block: int = 2048) -> np.ndarray:
    """Each unit row averaged with its up to ``neighbours`` nearest rows of cosine >= ``tau``."""
    Y = unit(Y)
    out = np.empty_like(Y)
    for start in range(0, len(Y), block):
        S = Y[start:start + block] @ Y.T
        top = np.argpartition(-S, neighbours, axis=1)[:, :neighbours + 1]  # includes the row itself
        near = np.take_along_axis(S, top, axis=1) >= tau
        for i in range(len(S)):
            members = top[i][near[i]]
            out[start + i] = Y[members].mean(axis=0) if len(members) else Y[start + i]
    return out


def local_projection(Y: np.ndarray, images: np.ndarray, groups: np.ndarray, *, rank: int = 2) -> np.ndarray:
    """``Y`` (already projected) with each row's component along the top-``rank`` directions of
    its nearest group removed: a group's directions are the principal axes of its ``images``
    (projected the same way, centred on the group's mean), the nearest group the one whose mean
    has the highest cosine with the row."""
    keys, inverse = np.unique(groups, return_inverse=True)
    bases, means = [], []
    for g in range(len(keys)):
        members = images[inverse == g]
        means.append(members.mean(axis=0))
        bases.append(np.linalg.svd(members - means[-1], full_matrices=False)[2][:rank].T)
    nearest = np.argmax(unit(Y) @ unit(np.stack(means)).T, axis=1)
    out = np.array(Y, dtype=np.float64)
    for g in np.unique(nearest):
        rows = nearest == g
        out[rows] -= (out[rows] @ bases[g]) @ bases[g].T
    return out


def group_means(V: np.ndarray, groups: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """V with each row in ``mask`` replaced by the mean of the masked rows of its group."""
    out = np.array(V, dtype=np.float64)
    rows = np.flatnonzero(mask)
    keys, inverse = np.unique(groups[rows], return_inverse=True)
    sums = np.zeros((len(keys), V.shape[1]))
    np.add.at(sums, inverse, out[rows])
    out[rows] = (sums / np.bincount(inverse)[:, None])[inverse]
    return out


def kernel_projection_map_back(source: np.ndarray, target: np.ndarray, items: np.ndarray, k: int, *,
                               rff_dim: int = 1000, seed: int = 0) -> np.ndarray:
    """A Gaussian-kernel correction with the index kept d-dimensional: fit in random Fourier
    feature space (centred), null the top-k directions of R there, and map each corrected
    feature back with the least-squares linear map from features to embeddings of ``items``."""
    corrector = SchurCorrector(kernel="gaussian", center=True, rff_dim=rff_dim, seed=seed).fit(source, target)
    fmap = corrector.feature_map_
    S, T = fmap.transform(source), fmap.transform(target)
    S, T = S - S.mean(axis=0), T - T.mean(axis=0)
    R = (S.T @ T / len(S)).T @ corrector.gamma_  # C_TS Gamma
    _, vec = np.linalg.eigh((R + R.T) / 2)
    U = vec[:, ::-1][:, :k]
    phi = fmap.transform(items)
    back, *_ = np.linalg.lstsq(phi, items, rcond=None)
    return (phi - (phi @ U) @ U.T) @ back


def group_offsets(images: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each image minus the mean image of its group (the same object in each concept value):
    the within-group centring of ``SchurCorrector.fit(groups=...)``."""
    return group_centred(images, groups)


def partner_offsets(images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Each image minus the mean of itself and its nearest image (cosine) of each other prompt:
    the object's mean when the concept set does not say which images show the same object
    (after the projection, an image's nearest image of another concept value is mostly the
    same object's)."""
    prompts = np.asarray(prompts)
    cosines = unit(images) @ unit(images).T
    sums, counts = np.array(images, dtype=np.float64), np.ones(len(images))
    for value in np.unique(prompts):
        columns = np.flatnonzero(prompts == value)
        nearest = columns[np.argmax(cosines[:, columns], axis=1)]
        other = prompts != value
        sums[other] += images[nearest[other]]
        counts[other] += 1
    return images - sums / counts[:, None]


def weakest_concept_rows(X: np.ndarray, P: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``candidates`` with the least of X outside P's range (||x - x P||): the
    items the concept touches least, anchors chosen without labels."""
    strength = np.linalg.norm(X[candidates] - X[candidates] @ P, axis=1)
    return candidates[np.argsort(strength, kind="stable")[:n]]


def offset_regression(images: np.ndarray, offsets: np.ndarray, anchors: np.ndarray, items: np.ndarray, *,
                      gamma: float = 0.5, alpha: float = 1e-4) -> np.ndarray:
    """``items`` minus the offsets predicted by a Gaussian-kernel ridge regression fitted on
    ``images`` -> ``offsets`` (:func:`group_offsets` or :func:`partner_offsets`) and
    ``anchors`` -> 0 (rows without the concept, which should not move)."""
    from sklearn.kernel_ridge import KernelRidge

    inputs = np.concatenate([images, anchors])
    targets = np.concatenate([offsets, np.zeros_like(anchors, dtype=np.float64)])
    model = KernelRidge(kernel="rbf", gamma=gamma, alpha=alpha).fit(inputs, targets)
    return items - model.predict(items)
