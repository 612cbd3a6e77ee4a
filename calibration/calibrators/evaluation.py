"""Calibrators measured on images whose logits are at hand: confusions through the one decision pipeline,
the table's metrics (mIoU, class-IoU std, mean |Bias(l)|, ECE) and the decision's cost. numpy only, so
that `blda evaluate`, `blda export` and `blda bundle create` (torch-free) share it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.alignment import ShiftTables
from calibration.bias import bias_from_confusion, confusion_matrix, iou_from_confusion
from calibration.calibrators.calibrator import Calibrator, calibrator_probabilities, decide_calibrator
from calibration.labels import IGNORE_INDEX
from calibration.reliability import top_label_ece
from calibration.segmentation import resize_nearest, upsample_bilinear


@dataclass(frozen=True)
class LogitImage:
    """One labelled image as the decision sees it."""

    logits: np.ndarray  # (C, h, w) the model's logits
    label: np.ndarray  # (H, W) train ids
    decision: tuple[int, int]  # (H', W') the decision size (calibration.segmentation.decision_size)


def calibrator_confusion(
    images: Iterable[LogitImage], calibrator: Calibrator, shifts: ShiftTables | None, num_classes: int
) -> np.ndarray:
    """(C, C) int64 confusion [true, predicted] of the calibrator's decisions, resized to each label."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for im in images:
        made = decide_calibrator(im.logits, im.decision, calibrator, shifts)
        height, width = im.label.shape
        chosen = resize_nearest(made.calibrated[0], height, width)
        conf += confusion_matrix(chosen, im.label, num_classes, IGNORE_INDEX)
    return conf


def sample_pixels(
    images: Iterable[LogitImage], per_image: int = 2048, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled pixels of the logits upsampled to each label's size: logits (C, P), labels (P,)."""
    rng = np.random.default_rng(seed)
    zs, ys = [], []
    for im in images:
        flat = im.label.reshape(-1)
        valid = np.flatnonzero(flat != IGNORE_INDEX)
        if valid.size > per_image:
            valid = np.sort(rng.choice(valid, per_image, replace=False))
        up = upsample_bilinear(im.logits, im.label.shape)  # (C, H, W)
        zs.append(up.reshape(up.shape[0], -1)[:, valid])
        ys.append(flat[valid].astype(np.int64))
    if not zs:
        raise ValueError("images: expected at least one labelled image, got none")
    return np.concatenate(zs, axis=1), np.concatenate(ys)


def table_row(
    conf: np.ndarray,
    calibrator: Calibrator,
    shifts: ShiftTables | None,
    pixels: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """One row of the comparison: mIoU and class-IoU std over the classes present, mean |Bias(l)|, and the
    top-label ECE (15 bins) of the calibrator's probabilities on labelled pixels (C, P), (P,)."""
    iou = iou_from_confusion(conf)
    present = ~np.isnan(iou)
    logits, labels = pixels
    return {
        "calibrator": calibrator.name,
        "miou": float(iou[present].mean()) if present.any() else None,
        "iou_std": float(iou[present].std()) if present.any() else None,
        "mean_abs_bias": float(np.abs(bias_from_confusion(conf)).mean()),
        "ece": top_label_ece(calibrator_probabilities(logits, calibrator, shifts), labels),
        "temperature": calibrator.temperature,
        "tau": calibrator.tau,
    }


def decision_seconds(
    logits: np.ndarray,  # (C, h, w)
    size: tuple[int, int],
    calibrator: Calibrator,
    shifts: ShiftTables | None,
    repeats: int = 3,
) -> float:
    """Median wall time of the calibrator's decision (raw decision included) at `size`, after a warm-up."""
    decide_calibrator(logits, size, calibrator, shifts)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        decide_calibrator(logits, size, calibrator, shifts)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of rows from `table_row` (cost in ms when a row has "cost_ms")."""
    head = "| calibrator | mIoU | class-IoU std | mean abs Bias | ECE | cost (ms / 512x1024) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cost = f"{r['cost_ms']:.1f}" if r.get("cost_ms") is not None else "-"
        lines.append(
            f"| {r['calibrator']} | {_pct(r['miou'])} | {_pct(r['iou_std'])} | "
            f"{_pct(r['mean_abs_bias'], 3)} | {_pct(r['ece'])} | {cost} |"
        )
    return "\n".join(lines)


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"
