"""Means and covariances of paired feature rows, accumulated batch by batch (DESIGN.md section 2).

Every covariance the package uses comes from here: the SCE contract's uncentred
C_XX = X'X / n, C_YY, C_XY, and the centred ones of ``SchurCorrector(center=True)``. A
collection of a million pairs is summed shard by shard in O(D^2) memory; the in-memory
computation is the same code with one batch.

Numerics: the state is (n, means, M = sum of outer products of the rows minus their mean),
float64, as in Chan, Golub and LeVeque's pairwise update, each mean kept as a reference
point plus a small offset. Each batch is shifted by (about) its own mean, a vector of the
batch's dtype, before its products, so a large common offset costs no precision; batches and
partial sums from several workers combine with the pairwise formula in any order. Sums
wanted only uncentred (the SCE score) skip the shift (``shift=False``): they do not need it. The products of float32 rows run in float32 (BLAS
sgemm/ssyrk: twice as fast; the package's float32 policy, see ``_checks.as_matrix``) and are
summed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import as_matrix
from .errors import InputError


@dataclass(frozen=True)
class Covariances:
    """Finalised means and covariances of n paired rows; ``C_YY``, ``C_XY`` are None without Y.

    Uncentred (``centered=False``) they are C = sum_i x_i y_i' / n; centred, the rows'
    means are subtracted first. Both are float64.
    """

    n: int
    mean_x: np.ndarray
    C_XX: np.ndarray
    mean_y: np.ndarray | None = None
    C_YY: np.ndarray | None = None
    C_XY: np.ndarray | None = None
    centered: bool = False


class CovarianceAccumulator:
    """Running sums for the means and (cross-)covariances of paired rows (x_i, y_i).

    ``update(X, Y)`` adds a batch (row i of X pairs with row i of Y; Y may be left out for
    one side alone), ``merge(other)`` adds another accumulator's partial sums (for example
    from a worker that saw other shards), ``covariances(center=...)`` finalises. The result
    does not depend on how the rows were split into batches or merged, up to rounding.

    ``with_yy=False`` skips Y'Y (``C_YY`` is then None): a regression of Y on X needs only
    C_XX, C_XY and the means, and saves a third of the products. ``shift=False`` skips the
    per-batch shift (two passes over each batch): the uncentred covariances are as exact
    without it (the Chan terms cancel algebraically, whatever the means), the centred ones are
    not for data far from the origin, so they are refused; the means then have the precision
    of the rows' dtype.
    """

    def __init__(self, with_yy: bool = True, shift: bool = True) -> None:
        self.with_yy = bool(with_yy)
        self.shift = bool(shift)
        self.n = 0
        self._dims: tuple[int, int | None] | None = None
        self._ref_x = self._rel_x = self._ref_y = self._rel_y = None
        self._M_xx = self._M_yy = self._M_xy = None

    # -- adding data --------------------------------------------------------------------------
    def update(self, X, Y=None, *, copy: bool = True) -> "CovarianceAccumulator":
        """Add a batch of rows. ``copy=False`` lets the accumulator shift X and Y in place
        (the caller's arrays are then overwritten: for feature rows made only to be summed)."""
        X = as_matrix(X, "X")
        if Y is not None:
            Y = as_matrix(Y, "Y")
            if len(Y) != len(X):
                raise InputError(f"X and Y must have the same number of rows (pairs), got {len(X)} and {len(Y)}")
        if copy:
            X = X.copy()
            Y = None if Y is None else Y.copy()
        return self._add(X, Y)

    def _add(self, X: np.ndarray, Y: np.ndarray | None) -> "CovarianceAccumulator":
        """`update` of validated float32/float64 arrays the accumulator may overwrite."""
        self._check_dims(X.shape[1], None if Y is None else Y.shape[1])
        self._combine(*_batch_sums(X, Y, self.with_yy, self.shift))
        return self

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Add the partial sums of ``other`` (left unchanged) to these; returns self."""
        if not isinstance(other, CovarianceAccumulator):
            raise InputError(f"can only merge another CovarianceAccumulator, got {type(other).__name__}")
        if other.n == 0:
            return self
        if other.with_yy != self.with_yy and other._ref_y is not None:
            raise InputError("cannot merge an accumulator with Y'Y sums and one without (with_yy differs)")
        self._check_dims(*other._dims)
        self._combine(other.n, other._ref_x, other._rel_x, other._ref_y, other._rel_y,
                      other._M_xx, other._M_yy, other._M_xy)
        self.shift = self.shift and other.shift
        return self

    # -- results ------------------------------------------------------------------------------
    def covariances(self, center: bool = False) -> Covariances:
        """The means and covariances over every row added: uncentred (the SCE contract's
        C = sum x y' / n) or, with ``center``, of the rows minus their means."""
        if self.n == 0:
            raise InputError("no rows were added: the covariances need at least one pair")
        if center and not self.shift:
            raise InputError("centred covariances need the per-batch shift: accumulate with shift=True")
        n = self.n
        mean_x, mean_y = self.mean_x, self.mean_y

        def finish(M, a, b):
            if M is None:
                return None
            C = M / n
            if not center:
                C += np.outer(a, b)
            return C

        return Covariances(
            n=n, mean_x=mean_x, C_XX=finish(self._M_xx, mean_x, mean_x), mean_y=mean_y,
            C_YY=finish(self._M_yy, mean_y, mean_y), C_XY=finish(self._M_xy, mean_x, mean_y),
            centered=bool(center),
        )

    @property
    def mean_x(self) -> np.ndarray | None:
        return None if self._ref_x is None else self._ref_x + self._rel_x

    @property
    def mean_y(self) -> np.ndarray | None:
        return None if self._ref_y is None else self._ref_y + self._rel_y

    # -- internals ----------------------------------------------------------------------------
    def _check_dims(self, dx: int, dy: int | None) -> None:
        if self._dims is None:
            self._dims = (dx, dy)
        elif self._dims != (dx, dy):
            def show(d):
                return f"X {d[0]} columns" + ("" if d[1] is None else f", Y {d[1]}")
            raise InputError(f"this batch has {show((dx, dy))} but the earlier ones had {show(self._dims)}")

    def _combine(self, nb, ref_x, rel_x, ref_y, rel_y, M_xx, M_yy, M_xy) -> None:
        """Chan et al.'s pairwise update M = M_a + M_b + d_x d_y' n_a n_b / n, with each mean
        kept as reference + small offset so that d = mean_b - mean_a keeps its digits."""
        if self.n == 0:
            self.n = nb
            self._ref_x, self._rel_x = ref_x.copy(), rel_x.copy()
            self._M_xx = M_xx.copy()
            if ref_y is not None:
                self._ref_y, self._rel_y = ref_y.copy(), rel_y.copy()
                self._M_yy = None if M_yy is None else M_yy.copy()
                self._M_xy = M_xy.copy()
            return
        na, n = self.n, self.n + nb
        f = na * nb / n
        dx = (ref_x - self._ref_x) + rel_x - self._rel_x
        self._M_xx += M_xx
        self._M_xx += f * np.outer(dx, dx)
        self._rel_x += dx * (nb / n)
        if ref_y is not None:
            dy = (ref_y - self._ref_y) + rel_y - self._rel_y
            if self._M_yy is not None:
                self._M_yy += M_yy
                self._M_yy += f * np.outer(dy, dy)
            self._M_xy += M_xy
            self._M_xy += f * np.outer(dx, dy)
            self._rel_y += dy * (nb / n)
        self.n = n


def _mean_only(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(0, mean) with the mean in A's precision (a BLAS gemv): A is left as it is."""
    k = (np.ones(len(A), dtype=A.dtype) @ A) / A.dtype.type(len(A))
    return np.zeros(A.shape[1]), k.astype(np.float64)


def _shift(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift A in place by (about) its mean, a vector of A's dtype so the subtraction is exact
    for rows near it; returns (that shift, the mean of the shifted rows), float64.

    The shift only has to be near the mean (a BLAS gemv in A's precision); the sum of the
    shifted rows, which the mean and M are corrected with, is accumulated in float64.
    """
    k = (np.ones(len(A), dtype=A.dtype) @ A) / A.dtype.type(len(A))
    A -= k
    return k.astype(np.float64), A.sum(axis=0, dtype=np.float64) / len(A)


def _batch_sums(X: np.ndarray, Y: np.ndarray | None, with_yy: bool = True, shift: bool = True):
    """(n, ref_x, rel_x, ref_y, rel_y, M_xx, M_yy, M_xy) of one batch: mean = ref + rel;
    X and Y are overwritten."""
    nb = len(X)
    if Y is not None and X.dtype != Y.dtype:  # one product precision for both sides
        X, Y = X.astype(np.float64, copy=False), Y.astype(np.float64, copy=False)
    centre = _shift if shift else _mean_only
    ref_x, rel_x = centre(X)
    t_x = rel_x * np.sqrt(nb)  # t t' = n rel rel', exactly symmetric
    # X'X is one BLAS syrk; t t' removes what the shift left of the mean (tiny).
    M_xx = (X.T @ X).astype(np.float64, copy=False)
    M_xx -= np.outer(t_x, t_x)
    if Y is None:
        return nb, ref_x, rel_x, None, None, M_xx, None, None
    if not with_yy:
        # With X shifted, sum (x - m_x)(y - m_y)' = X_s'Y - n rel_x m_y': no cancellation, so Y
        # needs no shift when Y'Y is not wanted.
        mean_y = Y.sum(axis=0, dtype=np.float64) / nb if shift else _mean_only(Y)[1]
        M_xy = (X.T @ Y).astype(np.float64, copy=False)
        M_xy -= np.outer(rel_x * nb, mean_y)
        return nb, ref_x, rel_x, np.zeros_like(mean_y), mean_y, M_xx, None, M_xy
    ref_y, rel_y = centre(Y)
    t_y = rel_y * np.sqrt(nb)
    M_yy = (Y.T @ Y).astype(np.float64, copy=False)
    M_yy -= np.outer(t_y, t_y)
    M_xy = (X.T @ Y).astype(np.float64, copy=False)
    M_xy -= np.outer(t_x, t_y)
    return nb, ref_x, rel_x, ref_y, rel_y, M_xx, M_yy, M_xy


def covariances(X, Y=None, *, center: bool = False) -> Covariances:
    """The covariances of rows held in memory: one batch through the same accumulator."""
    return CovarianceAccumulator().update(X, Y).covariances(center=center)
