"""Confidence calibration: pixel-level top-label expected calibration error (ECE)."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def top_label_ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """probs (C, P) class probabilities, labels (P,) -> Σ_b |B_b|/P |acc(B_b) - conf(B_b)|.

    Pixels are binned by their top probability into `bins` equal-width bins of [0, 1] (right-closed, the
    first also holding 0); acc is the share of a bin's pixels whose top class is the label."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 2 or probs.shape[1] != labels.size:
        raise ValueError(f"expected probs (C, P) and labels (P,), got {probs.shape} and {labels.shape}")
    if labels.size == 0:
        raise ValueError("expected at least one labelled pixel, got none")
    conf = probs.max(axis=0)  # (P,)
    correct = (probs.argmax(axis=0) == labels).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(idx, weights=correct, minlength=bins) - np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(gap).sum() / labels.size)
