"""Serving tables of a trained model: its eval-mode logits sampled at the decision's resolution, refitted
with the core's one refit function (calibration.refit), and the PIT check on held-out labelled pixels."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from calibration.labels import IGNORE_INDEX
from calibration.refit import RefitConfig, RefitReport, refit_tables
from calibration.tables import CalibrationTables
from training.data.datasets import Sample
from training.evaluation.predictors import Predictor, upsample_logits


class PixelSampler:
    """Collects a random subset of (logits, label) pixels per image, for fitting logit distributions."""

    def __init__(self, pixels_per_image: int = 4096, seed: int = 0, ignore_index: int = IGNORE_INDEX) -> None:
        self.pixels_per_image = pixels_per_image
        self.rng = np.random.default_rng(seed)
        self.ignore_index = ignore_index
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray, label: np.ndarray) -> None:  # (C, H, W), (H, W)
        flat = label.reshape(-1)
        valid = np.flatnonzero(flat != self.ignore_index)
        if valid.size > self.pixels_per_image:
            valid = self.rng.choice(valid, self.pixels_per_image, replace=False)
        self.logits.append(logits.reshape(logits.shape[0], -1)[:, valid].astype(np.float32))  # (C, P)
        self.labels.append(flat[valid])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """logits (C, 1, P) and labels (1, P): the (C, H, W) layout calibration.distributions expects."""
        if not self.logits:
            raise ValueError("no pixels were collected")
        logits = np.concatenate(self.logits, axis=1)  # (C, P)
        labels = np.concatenate(self.labels)  # (P,)
        return logits[:, None, :], labels[None, :]


def sample_logits(
    predictor: Predictor,
    samples: Iterable[Sample],
    sampler: PixelSampler,
    labelled: bool = True,
) -> int:
    """Feed every sample's logits, upsampled to its image size (where the decision is made), to `sampler`
    with the ground truth, or unlabelled (every pixel eligible; labels 0) for a target domain whose labels
    must not be used. Returns the image count."""
    count = 0
    for sample in samples:
        image = np.asarray(sample.image)
        logits = upsample_logits(predictor(image[None]), (image.shape[0], image.shape[1]))[0]  # (C, H, W)
        label = np.asarray(sample.label) if labelled else np.zeros(image.shape[:2], np.uint8)
        sampler(logits, label)
        count += 1
    return count


def fit_serving_tables(
    predictor: Predictor,
    source: Iterable[Sample],
    target: Iterable[Any],
    config: RefitConfig = RefitConfig(),
    pixels_per_image: int = 4096,
) -> tuple[CalibrationTables, RefitReport]:
    """Source pairs from labelled source images, target pairs from unlabelled target images with confident
    pseudo-labels (ground truth of the target is never read here); thin target rows keep the source row."""
    src = PixelSampler(pixels_per_image, config.seed)
    if sample_logits(predictor, source, src) == 0:
        raise ValueError("source data: expected labelled images to fit calibration tables, got none")
    tgt = PixelSampler(pixels_per_image, config.seed + 1)
    if sample_logits(predictor, target, tgt, labelled=False) == 0:
        raise ValueError("target data: expected unlabelled target images to fit calibration tables, got none")
    source_logits, source_labels = src.arrays()
    target_logits, _ = tgt.arrays()
    return refit_tables(target_logits, config, source_logits, source_labels)
