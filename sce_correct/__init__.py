"""Schur-complement embedding corrections and the SCE score (mathematics only: numpy/scipy).

See DESIGN.md section 2. Public API:

- feature maps: `CosineFeatures`, `RandomFourierFeatures`
- scores: `sce_score` -> `SCEReport`; `matrix_entropy_score`, `vendi_score`, `rke_score`
- corrections: `SchurCorrector` (t2i, i2t, t2t; paired correction and projections)
- modes: `schur_modes`, `kernel_modes` -> list of `Mode`
"""
from .corrector import SchurCorrector
from .errors import ConflictError, InputError, NotFoundError, SceError
from .features import CosineFeatures, RandomFourierFeatures, gaussian_kernel, median_pairwise_distance
from .modes import Mode, kernel_modes, schur_modes
from .schur import SchurSpectra, schur_spectra
from .scores import SCEReport, matrix_entropy_score, report_from_spectra, rke_score, sce_score, vendi_score
from .textspan import SpanText, textspan

__all__ = [
    "CosineFeatures", "RandomFourierFeatures", "gaussian_kernel", "median_pairwise_distance",
    "SCEReport", "sce_score", "report_from_spectra", "matrix_entropy_score", "vendi_score", "rke_score",
    "SchurSpectra", "schur_spectra", "SchurCorrector", "Mode", "schur_modes", "kernel_modes",
    "SceError", "InputError", "NotFoundError", "ConflictError",
    "SpanText", "textspan",
]
