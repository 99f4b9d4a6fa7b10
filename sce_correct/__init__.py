"""Schur-complement embedding corrections and the SCE score (mathematics only: numpy/scipy).

See DESIGN.md section 2. Public API:

- feature maps: `CosineFeatures`, `RandomFourierFeatures`
- scores: `sce_score` -> `SCEReport`; `matrix_entropy_score`, `vendi_score`, `rke_score`
- collection scale: `CovarianceAccumulator` (covariances summed batch by batch, mergeable),
  `sce_score_batches`, `sce_score_from_covariances`, `SchurCorrector.fit_batches` / `partial_fit`
- corrections: `SchurCorrector` (t2i, i2t, t2t; paired correction and projections)
- modes: `schur_modes`, `kernel_modes` -> list of `Mode`
- heads: `textspan` (TEXTSPAN: the texts that span one attention head's outputs), `HeadAblation`
  (mean-ablate the heads that carry a concept)
- files: `load_corrector` (a saved SchurCorrector or HeadAblation)
"""
from .corrector import SchurCorrector
from .covariance import CovarianceAccumulator, Covariances, covariances
from .errors import ConflictError, InputError, NotFoundError, SceError
from .features import CosineFeatures, RandomFourierFeatures, gaussian_kernel, median_pairwise_distance
from .modes import Mode, ModeRanker, kernel_modes, paired_spectra_and_modes, schur_modes
from .schur import SchurSpectra, schur_spectra, schur_spectra_batches
from .scores import (SCEReport, matrix_entropy_score, report_from_spectra, rke_score, sce_score, sce_score_batches,
                     sce_score_from_covariances, vendi_score)
from .heads import HeadAblation
from .saved import load_corrector
from .textspan import SpanText, textspan

__all__ = [
    "CosineFeatures", "RandomFourierFeatures", "gaussian_kernel", "median_pairwise_distance",
    "CovarianceAccumulator", "Covariances", "covariances", "sce_score_batches", "sce_score_from_covariances",
    "SCEReport", "sce_score", "report_from_spectra", "matrix_entropy_score", "vendi_score", "rke_score",
    "SchurSpectra", "schur_spectra", "schur_spectra_batches", "SchurCorrector",
    "Mode", "ModeRanker", "schur_modes", "kernel_modes", "paired_spectra_and_modes",
    "SceError", "InputError", "NotFoundError", "ConflictError",
    "SpanText", "textspan", "HeadAblation", "load_corrector",
]
