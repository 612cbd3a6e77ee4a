"""Evaluation of a segmentation model on a labelled split: mIoU, per-class IoU, class-IoU spread and
Bias(l), raw and after post-hoc calibration at each τ.

The model is anything that maps uint8 images to logits (a `Predictor`): a torch network or an ONNX bundle
run by onnxruntime, so a shipped bundle is evaluated without its torch weights. The metric maths lives in
calibration.bias; this module only accumulates confusion matrices and formats the results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.bias import bias_from_confusion, confusion_matrix, iou_from_confusion, subset_mean_iou
from calibration.classes import NUM_CLASSES, SUBSETS
from calibration.labels import IGNORE_INDEX
from calibration.refit import RefitConfig
from calibration.segmentation import (
    DEFAULT_DECISION_SCALE,
    decide,
    decision_size,
    resize_nearest,
    upsample_bilinear,
)
from calibration.tables import CalibrationTables, pit_check
from training.config import DataConfig, data_config
from training.data.datasets import Sample
from training.datasets import load_split
from training.evaluation.predictors import (
    OnnxPredictor,
    Predictor,
    ResizingPredictor,
    TorchPredictor,
    model_input_size,
)
from training.tables import PixelSampler, fit_serving_tables


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def class_metrics(conf: np.ndarray, subset: Sequence[int] | None = None) -> dict[str, Any]:
    """Metrics of one confusion matrix (C, C) [true, predicted]; nan IoUs (absent classes) become None.
    "miou" and "iou_std" average the classes of `subset` (all when None; the SYNTHIA protocol's 16 or 13
    of a 19-way model); a 19-class confusion also reports the mIoU over each of those subsets."""
    iou = iou_from_confusion(conf)  # (C,)
    averaged = iou if subset is None else iou[list(subset)]
    present = ~np.isnan(averaged)
    bias = bias_from_confusion(conf)  # (C,)
    total = conf.sum()
    by_classes = {}
    if conf.shape[0] == NUM_CLASSES:
        by_classes = {str(k): _finite(subset_mean_iou(conf, ids)) for k, ids in SUBSETS.items()}
    # JSON has no NaN: undefined values are None.
    return {
        "miou": float(np.mean(averaged[present])) if present.any() else None,
        "iou_std": float(np.std(averaged[present])) if present.any() else None,
        "miou_by_classes": by_classes,
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


def accumulate_confusions(
    predictor: Predictor,
    samples: Iterable[Sample],
    num_classes: int,
    tables: CalibrationTables | None = None,
    taus: Sequence[float] = (),
    on_logits: Callable[[np.ndarray, np.ndarray], None] | None = None,
    decision_scale: float = DEFAULT_DECISION_SCALE,
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


def metrics_from_confusions(
    confusions: Confusions, class_names: Sequence[str], subset: Sequence[int] | None = None
) -> dict[str, Any]:
    return {
        "num_images": confusions.num_images,
        "classes": list(class_names),
        "raw": class_metrics(confusions.raw, subset),
        "calibrated": {
            f"{tau:g}": class_metrics(conf, subset) for tau, conf in confusions.calibrated.items()
        },
        "confusion_raw": confusions.raw.tolist(),
        "confusion_calibrated": {f"{tau:g}": conf.tolist() for tau, conf in confusions.calibrated.items()},
    }


def evaluate(
    predictor: Predictor,
    samples: Iterable[Sample],
    class_names: Sequence[str],
    tables: CalibrationTables | None = None,
    taus: Sequence[float] = (),
    subset: Sequence[int] | None = None,
) -> dict[str, Any]:
    """mIoU (over `subset`, default all classes), per-class IoU, class-IoU std, Bias(l), pixel accuracy;
    raw and calibrated at each τ."""
    confusions = accumulate_confusions(predictor, samples, len(class_names), tables, taus)
    return metrics_from_confusions(confusions, class_names, subset)


@dataclass(frozen=True)
class ModelUnderTest:
    predictor: Predictor
    tables: CalibrationTables | None
    class_names: list[str]
    description: dict[str, Any]
    # The data settings the model was trained with (a checkpoint's or bundle's config; {} when unknown).
    data_config: dict[str, Any] = field(default_factory=dict)


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
    from calibration.classes import CLASS_NAMES
    from training.models import load_model

    if bundle is not None:
        from calibration.bundle import load_bundle

        b = load_bundle(bundle)
        spec = b.manifest.input
        predictor: Predictor = OnnxPredictor(
            b.model_path,
            spec.mean,
            spec.std,
            spec.pixel_scale,
            threads,
            input_name=spec.name,
            output_name=b.manifest.output.name,
        )
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
        data_cfg = b.manifest.provenance.config.get("data")
        return (
            ModelUnderTest(
                predictor,
                b.tables,
                b.manifest.class_names,
                desc,
                data_cfg if isinstance(data_cfg, dict) else {},
            ),
            None,
        )
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
    data_cfg = loaded.config.get("data")
    return (
        ModelUnderTest(run, loaded.tables, names, desc, data_cfg if isinstance(data_cfg, dict) else {}),
        loaded.model,
    )


def class_subset(classes: int | None, num_classes: int) -> tuple[int, ...] | None:
    """The class indices "miou" averages for `--classes` (None: all `num_classes`); the 16 and 13 subsets
    are of the 19 Cityscapes classes."""
    if classes is None or classes == num_classes:
        return None
    if classes not in SUBSETS:
        raise ValueError(f"--classes: expected one of {sorted(SUBSETS)}, got {classes}")
    if num_classes != NUM_CLASSES:
        raise ValueError(
            f"--classes {classes}: expected a {NUM_CLASSES}-class model (subsets of the Cityscapes classes), "
            f"got {num_classes} classes"
        )
    return SUBSETS[classes]


TABLE_SOURCES = ("auto", "refit", "checkpoint", "bundle")


def serving_tables(
    mut: ModelUnderTest,
    data: Path,
    source: str,
    fit_limit: int,
    refit: RefitConfig,
    data_cfg: DataConfig | None = None,
) -> tuple[CalibrationTables | None, dict[str, Any]]:
    """The tables to calibrate with: "refit" (eval-mode logits of source train with labels and target train
    without, the exporter's refit), "checkpoint"/"bundle" (the model's own), "auto" (a bundle's own, else
    refit), or a calibration.npz file (e.g. the tables.npz an earlier refit of the same model wrote).
    Returns the tables and a description for the report."""
    if source.endswith(".npz"):
        from calibration.bundle import read_calibration

        return read_calibration(source), {"source": "file", "path": source}
    if source not in TABLE_SOURCES:
        raise ValueError(f"tables: expected one of {list(TABLE_SOURCES)} or a .npz file, got {source!r}")
    is_bundle = "bundle" in mut.description
    if source == "auto":
        source = "bundle" if is_bundle else "refit"
    if source in ("checkpoint", "bundle"):
        if source == "bundle" and not is_bundle:
            raise ValueError("tables: expected --bundle for tables='bundle', got a checkpoint")
        return mut.tables, {"source": source if mut.tables is not None else "none"}
    tables, report = fit_serving_tables(
        mut.predictor,
        load_split(data, "source", "train", fit_limit, data_cfg),
        load_split(data, "target", "train", fit_limit, data_cfg),
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
    classes: int | None = None,
    data_overrides: Sequence[str] = (),
    calibrators: Sequence[str] = (),
) -> dict[str, Any]:
    """`blda evaluate`: writes OUT/metrics.json and OUT/metrics.png, returns the metrics. τ = 0 entries are
    dropped (raw is always reported). `calibrators` (names, see calibration.calibrators.fit.parse_names)
    adds metrics["calibrators"]: each fitted with strengths chosen on the tuning split, and its table on
    the tuning split and on `split` (training.evaluation.calibrators). The PIT check of the tables runs on the evaluated split's labels.
    The data are read as the model's training data config says (defaults when unknown), with
    `data_overrides` ("key=value") on top. `classes` (19, 16 or 13; None: all of the model's) is the class
    subset "miou" averages, the SYNTHIA protocol's."""
    import dataclasses
    import json

    from training.evaluation.plots import plot_evaluation

    torch.set_num_threads(threads)
    mut, _ = open_model(checkpoint, bundle, network, teacher, threads, input_scale)
    subset = class_subset(classes, len(mut.class_names))
    data_cfg = data_config(mut.data_config, data_overrides)
    taus = [float(t) for t in taus if t > 0]
    from calibration.calibrators.fit import TABLE_CALIBRATORS, parse_names

    names = parse_names(calibrators) if calibrators else []
    chosen, tables_desc = (
        serving_tables(mut, data, tables, fit_limit, refit, data_cfg)
        if taus or TABLE_CALIBRATORS.intersection(names)
        else (None, {"source": "none"})
    )
    sampler = PixelSampler(4096, seed=7)
    samples = load_split(data, "target", split, limit, data_cfg)
    confusions = accumulate_confusions(mut.predictor, samples, len(mut.class_names), chosen, taus, sampler)
    target = metrics_from_confusions(confusions, mut.class_names, subset)
    if tables_desc["source"] == "refit" and chosen is not None:
        from calibration.bundle import write_calibration

        # The refit is the costly part: a later evaluation of the same model can read it (--tables FILE).
        write_calibration(out / "tables.npz", chosen)
    if chosen is not None:
        logits, labels = sampler.arrays()
        target["pit"] = pit_check(logits[:, 0, :], labels[0], chosen).to_dict()
    metrics: dict[str, Any] = {
        "model": mut.description,
        "data": str(data),
        "data_config": dataclasses.asdict(data_cfg),
        "split": split,
        "classes_averaged": len(mut.class_names) if subset is None else len(subset),
        "taus": taus,
        "calibration_tables": tables_desc,
        "target": target,
    }
    if with_source:
        source = load_split(data, "source", "val", limit, data_cfg)
        metrics["source"] = evaluate(mut.predictor, source, mut.class_names, subset=subset)
    if names:
        from training.evaluation.calibrators import compare_calibrators

        compared = compare_calibrators(mut.predictor, data, names, chosen, split, limit, data_cfg=data_cfg)
        metrics["calibrators"] = compared.to_json(split)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plot_evaluation({**target, "classes": mut.class_names}, out / "metrics.png")
    return metrics
