"""Input validation shared by the estimators: every error names the argument and the shape."""
from __future__ import annotations

import numpy as np

from .errors import InputError


def as_matrix(x, name: str, *, min_rows: int = 1) -> np.ndarray:
    """Return `x` as a finite float32 or float64 (n, d) array, or raise a ValueError naming `name`."""
    try:
        arr = np.asarray(x)
        # float32 embeddings stay float32 (the n-sized products then run at single precision);
        # everything else becomes float64.
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a numeric (n, d) array: {exc}") from None
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D (n, d), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise InputError(f"{name} needs at least {min_rows} rows, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise InputError(f"{name} has no columns (shape {arr.shape})")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise InputError(f"{name} contains NaN or inf in {bad} row(s)")
    return arr


def as_pair(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate two paired embedding matrices: same number of rows, at least two pairs."""
    a = as_matrix(a, name_a)
    b = as_matrix(b, name_b)
    if a.shape[0] != b.shape[0]:
        raise InputError(
            f"{name_a} and {name_b} must have the same number of rows (pairs), "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[0] < 2:
        raise InputError(f"need at least 2 pairs, got {a.shape[0]}")
    return a, b


# Features have unit norm, so covariance eigenvalues are at most 1: a ridge far above 1 only
# shrinks Gamma towards 0, and beyond this one n * ridge (the dual's ridge) can overflow.
MAX_RIDGE = 1e100


def check_ridge(ridge: float) -> float:
    ridge = float(ridge)
    if not 0 <= ridge <= MAX_RIDGE:  # NaN fails too
        raise InputError(f"ridge must be a number between 0 and {MAX_RIDGE:g}, got {ridge}")
    return ridge


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
