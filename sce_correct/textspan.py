"""TEXTSPAN: name what one attention head writes with a few texts from a bank (DESIGN.md section 7).

Given a head's outputs over n images, ``C`` (n x d, e.g. ``decompose(...).heads[:, l, h]``),
and a bank of m text embeddings ``R`` (m x d, same space):

1. the head's span: the top ``rank`` right singular vectors ``V`` of the (uncentred) outputs
   ``C``, i.e. the directions the head writes into; the texts are projected onto it (``R V``)
   and the outputs are centred over the images (``(C - mean) V``);
2. ``n_components`` times, greedily: take the text whose projected *direction* ``u_j`` (the
   projected text, normalised) explains the most variance of the current residual outputs,
   ``Var_i(c_i . u_j)``; record it; remove ``u_j`` from the outputs and from every text.

The variance explained is the population variance (over images, dividing by n) of the residual
outputs along the chosen unit direction: exactly what removing that direction takes away from
the outputs' total variance. The steps remove mutually orthogonal directions, so the recorded
variances add up to the variance the texts explain together, at most the total variance of
the centred outputs ``C.var(axis=0).sum()``.

The ranking uses the normalised direction, so it does not depend on the texts' norms. (The
paper's reference code ranks by ``Var(C r_j)`` with the projected, unnormalised ``r_j``, which
also favours texts lying closer to the head's span; the variance it reports is the one here.)
Computations run on the k x k covariance of the projected outputs (k = rank), so each step
costs O(m k^2) whatever the number of images; removing a direction from the outputs needs no
work, as later directions are orthogonal to it (see the loop). Pure numpy.
"""
from __future__ import annotations

import logging
import numbers
from typing import NamedTuple

import numpy as np

from ._checks import as_matrix
from .errors import InputError

logger = logging.getLogger(__name__)

# A text whose projected remainder is below this share of its own norm lies (up to rounding)
# in the span of the texts already picked: its direction is noise, so it is not a candidate.
_EXHAUSTED = 1e-8


class SpanText(NamedTuple):
    """One TEXTSPAN pick: the row of the text bank and the variance its direction explains."""

    index: int
    variance: float


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def textspan(head_outputs, text_bank, n_components: int = 10, rank: int = 80) -> list[SpanText]:
    """Greedy TEXTSPAN of one head: ``n_components`` (text index, variance explained) pairs.

    ``head_outputs``: (n, d) outputs of one head over n >= 2 images; ``text_bank``: (m, d) text
    embeddings in the same space (normalised or not: only their directions matter).
    ``rank``: dimension of the head's span (at most d; capped at n, beyond which the outputs
    have no further directions). Returns fewer picks only if the remaining texts all lie in
    the span of those already picked (a warning is logged).
    """
    outputs = as_matrix(head_outputs, "head_outputs", min_rows=2).astype(np.float64, copy=False)
    texts = as_matrix(text_bank, "text_bank").astype(np.float64, copy=False)
    n, d = outputs.shape
    m = texts.shape[0]
    if texts.shape[1] != d:
        raise InputError(f"text_bank has dimension {texts.shape[1]} but head_outputs has {d}")
    rank = _positive_int(rank, "rank")
    n_components = _positive_int(n_components, "n_components")
    if rank > d:
        raise InputError(f"rank must be at most the dimension d = {d}, got {rank}")
    if n_components > m:
        raise InputError(f"n_components ({n_components}) exceeds the {m} text(s) in text_bank")
    span_rank = min(rank, n)
    if n_components > span_rank:
        raise InputError(f"n_components ({n_components}) exceeds the span's rank ({span_rank}: "
                         f"rank {rank} capped at the {n} images)")

    _, _, vt = np.linalg.svd(outputs, full_matrices=False)
    basis = vt[:span_rank].T  # d x k, the head's span
    coords = (outputs - outputs.mean(axis=0)) @ basis  # centred outputs in span coordinates
    cov = coords.T @ coords / n  # k x k; the variance along unit u is u' cov u
    projected = texts @ basis  # m x k
    own_norm = np.linalg.norm(projected, axis=1)
    candidate = own_norm > 0
    picks: list[SpanText] = []
    for _ in range(n_components):
        sq_norm = np.einsum("mk,mk->m", projected, projected)
        candidate &= sq_norm > (_EXHAUSTED * own_norm) ** 2
        if not candidate.any():
            logger.warning("textspan: the remaining texts lie in the span of the %d already picked; "
                           "returning %d of %d components", len(picks), len(picks), n_components)
            break
        explained = np.full(m, -np.inf)
        rows = projected[candidate]
        explained[candidate] = np.einsum("mk,kl,ml->m", rows, cov, rows) / sq_norm[candidate]
        best = int(np.argmax(explained))
        u = projected[best] / np.sqrt(sq_norm[best])
        picks.append(SpanText(best, float(max(u @ cov @ u, 0.0))))
        candidate[best] = False
        # Remove u from every text. Removing it from the outputs too changes nothing after
        # that: every later direction is orthogonal to u, and along such a direction the
        # deflated outputs equal the original ones, so `cov` stays as it is.
        projected = projected - np.outer(projected @ u, u)
    return picks


__all__ = ["SpanText", "textspan"]
