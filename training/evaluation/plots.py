"""Figures for evaluation and diagnosis (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(xs: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in xs], dtype=np.float64)


def plot_evaluation(metrics: dict[str, Any], path: str | Path, tau: str | None = None) -> Path:
    """Per-class IoU bars (raw vs calibrated at `tau`, default the first) and Bias(l) bars."""
    plt = _pyplot()
    names = metrics["classes"]
    x = np.arange(len(names))
    raw = metrics["raw"]
    cal_all = metrics.get("calibrated", {})
    if tau is None and cal_all:
        tau = next(iter(cal_all))
    cal = cal_all.get(tau) if tau is not None else None
    fig, (ax_iou, ax_bias) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    width = 0.4 if cal else 0.8
    ax_iou.bar(
        x - (width / 2 if cal else 0), _values(raw["iou"]), width, label=f"raw (mIoU {raw['miou']:.3f})"
    )
    ax_bias.bar(x - (width / 2 if cal else 0), _values(raw["bias"]), width, label="raw")
    if cal:
        ax_iou.bar(
            x + width / 2, _values(cal["iou"]), width, label=f"calibrated τ={tau} (mIoU {cal['miou']:.3f})"
        )
        ax_bias.bar(x + width / 2, _values(cal["bias"]), width, label=f"calibrated τ={tau}")
    ax_iou.set_ylabel("IoU")
    ax_iou.set_ylim(0, 1)
    ax_iou.legend(loc="upper right")
    ax_bias.axhline(0, color="black", linewidth=0.8)
    ax_bias.set_ylabel("Bias(l)")
    ax_bias.legend(loc="upper right")
    ax_bias.set_xticks(x, names, rotation=60, ha="right")
    return _save(plt, fig, path)


def plot_diagnosis(report: dict[str, Any], path: str | Path) -> Path:
    """Per-class IoU on source val vs target val, and target Bias(l) against the label-free logit spread."""
    plt = _pyplot()
    names = report["classes"]
    x = np.arange(len(names))
    fig, (ax_iou, ax_corr) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [2, 1]})
    target = report["target"]
    if report.get("source") is not None:
        src = report["source"]
        ax_iou.bar(x - 0.2, _values(src["iou"]), 0.4, label=f"source val (mIoU {src['miou']:.3f})")
        ax_iou.bar(x + 0.2, _values(target["iou"]), 0.4, label=f"target val (mIoU {target['miou']:.3f})")
    else:
        ax_iou.bar(x, _values(target["iou"]), 0.8, label=f"target val (mIoU {target['miou']:.3f})")
    ax_iou.set_xticks(x, names, rotation=60, ha="right")
    ax_iou.set_ylabel("IoU")
    ax_iou.set_ylim(0, 1)
    ax_iou.legend()
    bias = _values(target["bias"])
    spread = _values(report["label_free_bias"])
    ax_corr.scatter(spread, bias)
    for i, name in enumerate(names):
        if np.isfinite(bias[i]) and np.isfinite(spread[i]):
            ax_corr.annotate(name, (spread[i], bias[i]), fontsize=7)
    rho = report["spearman"]["rho"]
    ax_corr.set_title(f"target: Bias(l) vs label-free bias (Spearman ρ = {rho:.2f})")
    ax_corr.set_xlabel("label-free bias (positive/negative logit spread)")
    ax_corr.set_ylabel("Bias(l)")
    ax_corr.axhline(0, color="black", linewidth=0.8)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[list[list[float]]]], path: str | Path, title: str = "") -> Path:
    """mIoU against iterations: per variant, the mean over seeds (line) and each seed (faint), from
    {variant: [[(iteration, mIoU %), ...] per seed]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        iters = sorted({int(it) for r in runs for it, _ in r})
        table = np.full((len(runs), len(iters)), np.nan)
        for i, run in enumerate(runs):
            for it, value in run:
                table[i, iters.index(int(it))] = value
        (line,) = ax.plot(iters, np.nanmean(table, axis=0), marker="o", label=f"{name} ({len(runs)} seeds)")
        for row in table:
            ax.plot(iters, row, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("iteration (the last point: after AdaBN)")
    ax.set_ylabel("target tuning mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, path)
