"""Evaluation of a segmentation model on a labelled split: mIoU, per-class IoU, class-IoU spread and
Bias(l), raw and after post-hoc calibration at each τ.

The model is anything that maps uint8 images to logits (a `Predictor`): a torch network or an ONNX bundle
run by onnxruntime, so a shipped bundle is evaluated without its torch weights. The metric maths lives in
calibration.bias; this module only accumulates confusion matrices and formats the results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.bias import bias_from_confusion, confusion_matrix, iou_from_confusion
from calibration.labels import IGNORE_INDEX
from calibration.refit import RefitConfig
from calibration.segmentation import decide, decision_size, resize_nearest, upsample_bilinear
from calibration.tables import CalibrationTables, pit_check
from training.datasets import load_split
from training.evaluation.predictors import (
    LabelledSample,
    OnnxPredictor,
    Predictor,
    ResizingPredictor,
    TorchPredictor,
)
from training.tables import PixelSampler, fit_serving_tables

# The service's default decision_scale (service.settings): evaluated masks are served masks.
DECISION_SCALE = 2.0


def class_metrics(conf: np.ndarray) -> dict[str, Any]:
    """Metrics of one confusion matrix (C, C) [true, predicted]; nan IoUs (absent classes) become None."""
    iou = iou_from_confusion(conf)  # (C,)
    present = ~np.isnan(iou)
    bias = bias_from_confusion(conf)  # (C,)
    total = conf.sum()
    # JSON has no NaN: undefined values are None.
    return {
        "miou": float(np.mean(iou[present])) if present.any() else None,
        "iou_std": float(np.std(iou[present])) if present.any() else None,
        "pixel_accuracy": float(np.trace(conf) / total) if total else None,
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "bias": [None if np.isnan(v) else float(v) for v in bias],
        "predicted_fraction": (conf.sum(0) / max(int(total), 1)).tolist(),
        "true_fraction": (conf.sum(1) / max(int(total), 1)).tolist(),
    }


@dataclass(frozen=True)
class Confusions:
    raw: np.ndarray  # (C, C) int64
    calibrated: dict[float, np.ndarray]  # τ -> (C, C) int64
    num_images: int


def model_input_size(predictor: Predictor, height: int, width: int) -> tuple[int, int]:
    """(H, W) the model sees for an (height, width) image: a ResizingPredictor's target, else the image's."""
    if isinstance(predictor, ResizingPredictor):
        return predictor.target_size(height, width)
    return height, width


def accumulate_confusions(
    predictor: Predictor,
    samples: Iterable[LabelledSample],
    num_classes: int,
    tables: CalibrationTables | None = None,
    taus: Sequence[float] = (),
    on_logits: Callable[[np.ndarray, np.ndarray], None] | None = None,
    decision_scale: float = DECISION_SCALE,
) -> Confusions:
    """One pass over the samples (one image at a time: sizes may differ).

    Decisions are the service's (calibration.segmentation.decide): logits upsampled bilinearly to the
    model's input size x `decision_scale`, at most the label's size, the raw argmax and the calibrated
    rule on those same logits, then the nearest resize to the label. Where the label is no larger than
    input x scale (the synthetic benchmark: 256 x 512 labels, 128 x 256 bundle inputs) that is the
    upsample to the label size itself. `on_logits(logits (C, H, W), label (H, W))` lets a caller collect
    logits upsampled to the label size in the same pass."""
    if taus and tables is None:
        raise ValueError("taus: calibrated metrics need calibration tables, got none")
    raw = np.zeros((num_classes, num_classes), np.int64)
    cal = {float(t): np.zeros((num_classes, num_classes), np.int64) for t in taus}
    count = 0
    for sample in samples:
        label = np.asarray(sample.label)
        logits = predictor(np.asarray(sample.image)[None])  # (1, C, h, w)
        if logits.shape[1] != num_classes:
            raise ValueError(f"logits: expected {num_classes} classes, got {logits.shape[1]} ({sample.name})")
        height, width = label.shape[0], label.shape[1]
        size = decision_size((height, width), model_input_size(predictor, height, width), decision_scale)
        made = decide(logits[0], size, tables.shifts if tables is not None else None, list(cal))
        raw += confusion_matrix(resize_nearest(made.raw, height, width), label, num_classes, IGNORE_INDEX)
        for conf, chosen in zip(cal.values(), made.calibrated, strict=True):
            conf += confusion_matrix(resize_nearest(chosen, height, width), label, num_classes, IGNORE_INDEX)
        if on_logits is not None:
            on_logits(upsample_bilinear(logits[0], (height, width)), label)
        count += 1
    if count == 0:
        raise ValueError("samples: expected at least one labelled image, got none")
    return Confusions(raw, cal, count)


def metrics_from_confusions(confusions: Confusions, class_names: Sequence[str]) -> dict[str, Any]:
    return {
        "num_images": confusions.num_images,
        "classes": list(class_names),
        "raw": class_metrics(confusions.raw),
        "calibrated": {f"{tau:g}": class_metrics(conf) for tau, conf in confusions.calibrated.items()},
        "confusion_raw": confusions.raw.tolist(),
        "confusion_calibrated": {f"{tau:g}": conf.tolist() for tau, conf in confusions.calibrated.items()},
    }


def evaluate(
    predictor: Predictor,
    samples: Iterable[LabelledSample],
    class_names: Sequence[str],
    tables: CalibrationTables | None = None,
    taus: Sequence[float] = (),
) -> dict[str, Any]:
    """mIoU, per-class IoU, class-IoU std, Bias(l), pixel accuracy; raw and calibrated at each τ."""
    confusions = accumulate_confusions(predictor, samples, len(class_names), tables, taus)
    return metrics_from_confusions(confusions, class_names)


@dataclass(frozen=True)
class ModelUnderTest:
    predictor: Predictor
    tables: CalibrationTables | None
    class_names: list[str]
    description: dict[str, Any]


def open_model(
    checkpoint: Path | None = None,
    bundle: Path | None = None,
    network: str | None = None,
    teacher: bool = False,
    threads: int = 2,
    input_scale: float | None = None,
) -> tuple[ModelUnderTest, torch.nn.Module | None]:
    """A predictor from a bundle (onnxruntime) or a checkpoint (torch); the torch module when there is one.

    Images are resized before the model: by `input_scale` when given, else to the bundle's input size or
    by the checkpoint's evaluation scale (data.eval_scale), else not at all. A checkpoint's tables are its
    training-time GMM state (`tables="checkpoint"` in run_evaluate)."""
    from training.data.classes import CLASS_NAMES
    from training.models import load_model

    if bundle is not None:
        from calibration.bundle import load_bundle

        b = load_bundle(bundle)
        spec = b.manifest.input
        predictor: Predictor = OnnxPredictor(b.model_path, spec.mean, spec.std, spec.pixel_scale, threads)
        if input_scale is not None:
            predictor = ResizingPredictor(predictor, scale=input_scale)
        elif spec.size is not None:
            predictor = ResizingPredictor(predictor, size=spec.size)
        desc: dict[str, Any] = {
            "bundle": str(bundle),
            "name": b.name,
            "version": b.version,
            "network": b.manifest.provenance.network,
            "trained": b.manifest.provenance.trained,
        }
        return ModelUnderTest(predictor, b.tables, b.manifest.class_names, desc), None
    if checkpoint is None:
        raise ValueError("expected a checkpoint or a bundle, got neither")
    loaded = load_model(checkpoint, network, teacher)
    desc = {
        "checkpoint": str(checkpoint),
        "network": loaded.network,
        "weights": "teacher" if teacher else "student",
    }
    if loaded.iteration is not None:
        desc["iteration"] = loaded.iteration
    names = list(CLASS_NAMES[: int(getattr(loaded.model, "num_classes", len(CLASS_NAMES)))])
    scale = input_scale if input_scale is not None else loaded.eval_scale
    desc["input_scale"] = scale
    run: Predictor = TorchPredictor(loaded.model)
    if scale is not None and scale != 1.0:
        run = ResizingPredictor(run, scale=scale)
    return ModelUnderTest(run, loaded.tables, names, desc), loaded.model


TABLE_SOURCES = ("auto", "refit", "checkpoint", "bundle")


def serving_tables(
    mut: ModelUnderTest, data: Path, source: str, fit_limit: int, refit: RefitConfig
) -> tuple[CalibrationTables | None, dict[str, Any]]:
    """The tables to calibrate with: "refit" (eval-mode logits of source train with labels and target train
    without, the exporter's refit), "checkpoint"/"bundle" (the model's own), "auto" (a bundle's own, else
    refit). Returns the tables and a description for the report."""
    if source not in TABLE_SOURCES:
        raise ValueError(f"tables: expected one of {list(TABLE_SOURCES)}, got {source!r}")
    is_bundle = "bundle" in mut.description
    if source == "auto":
        source = "bundle" if is_bundle else "refit"
    if source in ("checkpoint", "bundle"):
        if source == "bundle" and not is_bundle:
            raise ValueError("tables: expected --bundle for tables='bundle', got a checkpoint")
        return mut.tables, {"source": source if mut.tables is not None else "none"}
    tables, report = fit_serving_tables(
        mut.predictor,
        load_split(data, "source", "train", fit_limit),
        load_split(data, "target", "train", fit_limit),
        refit,
    )
    return tables, {
        "source": "refit",
        "images_per_domain": fit_limit,
        "keep_fraction": refit.keep_fraction,
        "target_pixels": report.target_pixels.tolist(),
        "fallback_rows": [int(c) for c in np.flatnonzero(report.fallback_rows)],
    }


def run_evaluate(
    *,
    data: Path,
    out: Path,
    checkpoint: Path | None = None,
    bundle: Path | None = None,
    network: str | None = None,
    teacher: bool = False,
    split: str = "val",
    taus: Sequence[float] = (0.2,),
    limit: int = 0,
    with_source: bool = False,
    fit_limit: int = 200,
    input_scale: float | None = None,
    threads: int = 2,
    tables: str = "auto",
    refit: RefitConfig = RefitConfig(),
) -> dict[str, Any]:
    """`blda evaluate`: writes OUT/metrics.json and OUT/metrics.png, returns the metrics. τ = 0 entries are
    dropped (raw is always reported). The PIT check of the tables runs on the evaluated split's labels."""
    import json

    from training.evaluation.plots import plot_evaluation

    torch.set_num_threads(threads)
    mut, _ = open_model(checkpoint, bundle, network, teacher, threads, input_scale)
    taus = [float(t) for t in taus if t > 0]
    chosen, tables_desc = (
        serving_tables(mut, data, tables, fit_limit, refit) if taus else (None, {"source": "none"})
    )
    sampler = PixelSampler(4096, seed=7)
    confusions = accumulate_confusions(
        mut.predictor, load_split(data, "target", split, limit), len(mut.class_names), chosen, taus, sampler
    )
    target = metrics_from_confusions(confusions, mut.class_names)
    if chosen is not None:
        logits, labels = sampler.arrays()
        target["pit"] = pit_check(logits[:, 0, :], labels[0], chosen).to_dict()
    metrics: dict[str, Any] = {
        "model": mut.description,
        "data": str(data),
        "split": split,
        "taus": taus,
        "calibration_tables": tables_desc,
        "target": target,
    }
    if with_source:
        metrics["source"] = evaluate(mut.predictor, load_split(data, "source", "val", limit), mut.class_names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plot_evaluation({**target, "classes": mut.class_names}, out / "metrics.png")
    return metrics
