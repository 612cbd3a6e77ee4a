"""Class statistics of a labelled dataset and DAFormer's rare-class sampling (RCS).

RCS draws a class c with probability ∝ exp((1 − f_c) / T), f_c the class's share of labelled pixels, then an
image that contains at least `min_pixels` of it, so that rare classes are seen often enough to be learned.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from calibration.classes import IGNORE_INDEX, NUM_CLASSES


def class_pixel_counts(
    label: np.ndarray, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(H, W) ids -> (C,) int64 pixels per class; ignore and out-of-range ids are not counted."""
    ids = label.ravel().astype(np.int64)
    ids = ids[(ids != ignore_index) & (ids >= 0) & (ids < num_classes)]
    return np.bincount(ids, minlength=num_classes).astype(np.int64)


def dataset_class_counts(labels: Iterable[np.ndarray], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(N, C) int64 pixel counts per image and class."""
    rows = [class_pixel_counts(lab, num_classes) for lab in labels]
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)


def rcs_probabilities(counts: np.ndarray, temperature: float = 0.01) -> np.ndarray:
    """(N, C) or (C,) pixel counts -> (C,) sampling probability per class; classes never seen get 0."""
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    totals = counts.reshape(-1, counts.shape[-1]).sum(axis=0).astype(np.float64)  # (C,)
    if totals.sum() <= 0:
        raise ValueError("counts: expected at least one labelled pixel, got none")
    freq = totals / totals.sum()
    logits = np.where(totals > 0, (1.0 - freq) / temperature, -np.inf)
    logits -= logits[np.isfinite(logits)].max()
    p = np.exp(logits)
    return p / p.sum()


class RareClassSampler:
    """Draws (image index, class) pairs: class by RCS, then uniformly an image with enough pixels of it."""

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000) -> None:
        if counts.ndim != 2:
            raise ValueError(f"counts: expected (N, C) pixel counts, got shape {counts.shape}")
        self.counts = counts
        self.temperature = temperature
        self.min_pixels = min_pixels
        self.images_with = [np.flatnonzero(counts[:, c] >= min_pixels) for c in range(counts.shape[1])]
        p = rcs_probabilities(counts, temperature)
        # a class without any image above the threshold cannot be served
        p = np.where([len(ix) > 0 for ix in self.images_with], p, 0.0)
        if p.sum() <= 0:
            raise ValueError(f"min_pixels: no image has {min_pixels} pixels of any class")
        self.probabilities = p / p.sum()

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        c = int(rng.choice(len(self.probabilities), p=self.probabilities))
        return int(rng.choice(self.images_with[c])), c
