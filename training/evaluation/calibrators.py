"""`blda evaluate --calibrators`: BLDA's alignment beside the classical corrections, on one model.

The model runs once per image: the logits of the tuning split, the evaluated split, a pixel sample of
target train (EM) and of source val (BCTS) are collected, then every calibrator is fitted and measured on
them (calibration.calibrators). Strengths and the default are chosen on the tuning split only; the
evaluated split is read for the table alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.calibrators.calibrator import Calibrator
from calibration.calibrators.evaluation import (
    LogitImage,
    calibrator_confusion,
    decision_seconds,
    sample_pixels,
    table_row,
)
from calibration.calibrators.fit import BLDA_TAUS, FitInputs, choose_default, fit_calibrators
from calibration.calibrators.priors import class_priors
from calibration.calibrators.store import calibrators_json
from calibration.segmentation import DEFAULT_DECISION_SCALE, decision_size, upsample_bilinear
from calibration.tables import CalibrationTables
from training.config import DataConfig
from training.data.datasets import Sample
from training.datasets import load_split, open_split, source_class_counts
from training.evaluation.predictors import Predictor, model_input_size
from training.tables import PixelSampler, sample_logits

# The cost column: a 512 x 1024 image on logits at stride 4 of it, decided at the image's size.
COST_IMAGE = (512, 1024)


def logit_images(
    predictor: Predictor, samples: Iterable[Sample], decision_scale: float = DEFAULT_DECISION_SCALE
) -> list[LogitImage]:
    """The model's logits of each labelled image, with its decision size (as `blda evaluate` decides)."""
    out = []
    for sample in samples:
        label = np.asarray(sample.label)
        logits = predictor(np.asarray(sample.image)[None])[0].astype(np.float32)  # (C, h, w)
        height, width = label.shape
        size = decision_size((height, width), model_input_size(predictor, height, width), decision_scale)
        out.append(LogitImage(logits, label, size))
    if not out:
        raise ValueError("samples: expected at least one labelled image, got none")
    return out


def pixel_sample(
    predictor: Predictor, samples: Iterable[Sample], labelled: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(C, P) logits at the image size and (P,) labels (zeros when unlabelled) of a pixel sample."""
    sampler = PixelSampler(4096, seed=seed)
    if sample_logits(predictor, samples, sampler, labelled=labelled) == 0:
        raise ValueError("expected at least one image to sample pixels from, got none")
    logits, labels = sampler.arrays()
    return logits[:, 0, :], labels[0].astype(np.int64)


def source_priors(data: Path, data_cfg: DataConfig | None, num_classes: int) -> np.ndarray:
    """(C,) class priors of the source training labels (logit adjustment's π_source, EM's π_s)."""
    return class_priors(source_class_counts(open_split(data, "source", "train", data_cfg), num_classes))


def cost_logits(image: LogitImage) -> np.ndarray:
    """(C, 128, 256) logits standing for a 512 x 1024 image: a real image's, resized bilinearly."""
    return upsample_bilinear(image.logits, (COST_IMAGE[0] // 4, COST_IMAGE[1] // 4))


@dataclass(frozen=True)
class Comparison:
    fitted: dict[str, Calibrator]  # name -> calibrator, strengths chosen on tuning
    rows: dict[str, list[dict[str, Any]]]  # split -> rows of table_row ("tuning" always)
    default: str  # best tuning mIoU (calibration.calibrators.fit.choose_default)
    images: dict[str, int]

    def to_json(self, split: str) -> dict[str, Any]:
        stored = calibrators_json(self.fitted, 0)["calibrators"]
        return {
            "split": split,
            "images": self.images,
            **self.rows,
            "default": self.default,
            "calibrators": {c["name"]: c for c in stored},
        }


def compare_calibrators(
    predictor: Predictor,
    data: Path,
    names: Sequence[str],
    tables: CalibrationTables | None,
    split: str = "val",
    limit: int = 0,
    fit_limit: int = 100,
    data_cfg: DataConfig | None = None,
    priors: np.ndarray | None = None,
    cost: bool = True,
    blda_taus: Sequence[float] = BLDA_TAUS,
) -> Comparison:
    """Fit every calibrator of `names` (strengths on the tuning split), then the table on `split` and on
    tuning: rows of calibration.calibrators.evaluation.table_row, plus "cost_ms" per 512 x 1024 image."""
    tuning = logit_images(predictor, load_split(data, "target", "tuning", 0, data_cfg))
    c = int(tuning[0].logits.shape[0])
    if priors is None:
        priors = source_priors(data, data_cfg, c)
    target, _ = pixel_sample(predictor, load_split(data, "target", "train", fit_limit, data_cfg), False, 1)
    src_z, src_y = pixel_sample(predictor, load_split(data, "source", "val", fit_limit, data_cfg), True, 2)
    shifts = tables.shifts if tables is not None else None
    inputs = FitInputs(priors, target, src_z, src_y, tuning, shifts, blda_taus=blda_taus)
    fitted = fit_calibrators(inputs, names)
    evaluated = (
        tuning
        if split == "tuning"
        else logit_images(predictor, load_split(data, "target", split, limit, data_cfg))
    )
    rows: dict[str, list[dict[str, Any]]] = {}
    for which, images in (("tuning", tuning), (split, evaluated)):
        pixels = sample_pixels(images, 2048, seed=3)
        rows[which] = [
            table_row(calibrator_confusion(images, cal, shifts, c), cal, shifts, pixels)
            for cal in fitted.values()
        ]
    if cost:
        z = cost_logits(evaluated[0])
        for row in rows[split]:
            row["cost_ms"] = 1e3 * decision_seconds(z, COST_IMAGE, fitted[row["calibrator"]], shifts)
    counts = {"tuning": len(tuning), split: len(evaluated)}
    return Comparison(fitted, rows, choose_default(rows["tuning"]), counts)
