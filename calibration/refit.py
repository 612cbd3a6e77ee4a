"""Refit serving tables from logits: the one implementation behind `blda export`, `blda bundle create` and
the service's live recalibration.

Serving tables must describe the logits the service will see: eval-mode logits of the final model (after
any BatchNorm re-estimation), at the resolution the decision is made. Source pairs are fitted with labels;
target pairs with pseudo-labels: the argmax, optionally only the most confident share of each predicted
class's pixels (class-wise quantile thresholds, so that hard classes keep pseudo-labels too). A target row
with too few pseudo-labelled pixels keeps a fallback row (the source row on export; the current tables'
row when recalibrating live), and the report says which rows did.

The default keeps every pixel (keep_fraction 1): on the tuning split of the synthetic benchmark the
confident subsets describe the held-out positive logits worse (PIT deviation 0.27 at 0.5, 0.20 at 0.8,
0.15 at 1: a confident subset's own-class logits sit above the class's typical pixel) for the same
calibrated mIoU (within 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.distributions import Gmm, fit_pair_gmms
from calibration.labels import IGNORE_INDEX
from calibration.logits import softmax
from calibration.tables import CalibrationTables, build_calibration_tables


@dataclass(frozen=True)
class RefitConfig:
    components: int = 5
    max_samples: int = 20000  # pixels per true class fed to the EM
    # Per predicted class, the most confident share of its pixels become target pseudo-labels (1: argmax).
    keep_fraction: float = 1.0
    # A target row (true class c) fitted from fewer pseudo-labelled pixels keeps the fallback row.
    min_row_pixels: int = 500
    num_knots: int = 256
    eps: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction: expected a value in (0, 1], got {self.keep_fraction}")
        if self.min_row_pixels < 1:
            raise ValueError(f"min_row_pixels: expected >= 1, got {self.min_row_pixels}")


@dataclass(frozen=True)
class RefitReport:
    target_pixels: np.ndarray  # (C,) int64 pseudo-labelled target pixels per class
    fallback_rows: np.ndarray  # (C,) bool: rows that kept the fallback (too few target pixels)
    keep_fraction: float


def select_pseudo_labels(
    logits: np.ndarray,  # (C, *S) logits of unlabelled pixels
    keep_fraction: float,
) -> np.ndarray:
    """(*S) int64 pseudo-labels: the argmax where its softmax confidence is among the top `keep_fraction`
    of the pixels predicted as that class, IGNORE_INDEX elsewhere."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim < 2:
        raise ValueError(f"expected logits of shape (C, ...), got {logits.shape}")
    pred = logits.argmax(0)  # (*S)
    if keep_fraction >= 1.0:
        return pred.astype(np.int64)
    conf = softmax(logits, axis=0).max(0)  # (*S)
    labels = np.full(pred.shape, IGNORE_INDEX, dtype=np.int64)
    for c in np.unique(pred):
        members = pred == c
        threshold = np.quantile(conf[members], 1.0 - keep_fraction)
        labels[members & (conf >= threshold)] = c
    return labels


def refit_tables(
    target_logits: np.ndarray,  # (C, H, W) | (N, C, H, W) eval-mode logits of unlabelled target pixels
    config: RefitConfig,
    source_logits: np.ndarray | None = None,  # labelled source pixels, same layout
    source_labels: np.ndarray | None = None,  # (H, W) | (N, H, W) train ids
    fallback: CalibrationTables | None = None,  # tables whose rows serve where target pixels are too few
) -> tuple[CalibrationTables, RefitReport]:
    """Serving tables: source pairs from labelled source logits (else the fallback's), target pairs from
    confident pseudo-labels, anchors from the source pairs only. Thin target rows keep the fallback's
    target row, or the source row when there is no fallback."""
    c = int(np.asarray(target_logits).shape[-3])
    if (source_logits is None) != (source_labels is None):
        raise ValueError("expected source_logits and source_labels together")
    if source_logits is not None and source_labels is not None:
        source, source_counts = fit_pair_gmms(
            source_logits,
            source_labels,
            c,
            k=config.components,
            max_samples=config.max_samples,
            seed=config.seed,
        )
    elif fallback is not None:
        source, source_counts = fallback.source, fallback.source_counts
    else:
        raise ValueError("expected labelled source logits or fallback tables to take the source pairs from")
    channel_axis = np.asarray(target_logits).ndim - 3
    pseudo = select_pseudo_labels(
        np.moveaxis(np.asarray(target_logits), channel_axis, 0), config.keep_fraction
    )
    target, target_counts = fit_pair_gmms(
        target_logits, pseudo, c, k=config.components, max_samples=config.max_samples, seed=config.seed + 1
    )
    rows = target_counts[:, 0] if target_counts.size else np.zeros(c, np.int64)
    thin = rows < config.min_row_pixels  # (C,)
    base = fallback.target if fallback is not None else source
    base_counts = fallback.target_counts if fallback is not None else source_counts
    merged = Gmm(
        np.where(thin[:, None, None], base.weights, target.weights),
        np.where(thin[:, None, None], base.means, target.means),
        np.where(thin[:, None, None], base.stds, target.stds),
    )
    merged_counts = np.where(thin[:, None], base_counts, target_counts)
    tables = build_calibration_tables(
        source, source_counts, merged, merged_counts, num_knots=config.num_knots, eps=config.eps
    )
    return tables, RefitReport(rows.astype(np.int64), thin, config.keep_fraction)
