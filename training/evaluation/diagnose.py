"""Is the synthetic benchmark a real adaptation problem? A source-only model on the target validation split:
mIoU (against the source validation split), per-class IoU and Bias(l), and the rank correlation between
Bias(l) and the label-free bias read from the positive/negative logit distributions (the paper reports a
Spearman correlation above 0.9 on GTA5 -> Cityscapes)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.bias import label_free_bias
from calibration.distributions import fit_pair_gmms
from training.datasets import load_split
from training.evaluation.evaluate import accumulate_confusions, class_metrics, evaluate
from training.evaluation.predictors import Predictor, ResizingPredictor, TorchPredictor
from training.models import LoadedModel, load_model
from training.tables import PixelSampler


def spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Spearman rank correlation over the entries finite in both (classes absent from the data drop out)."""
    from scipy.stats import spearmanr

    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return {"rho": None, "p_value": None, "classes_used": int(keep.sum())}
    result = spearmanr(x[keep], y[keep])
    rho, p = float(result.statistic), float(result.pvalue)
    return {
        "rho": rho if np.isfinite(rho) else None,
        "p_value": p if np.isfinite(p) else None,
        "classes_used": int(keep.sum()),
    }


def _none_to_nan(xs: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in xs], dtype=np.float64)


def diagnose(
    predictor: Predictor,
    target_val: Any,
    class_names: list[str],
    source_val: Any | None = None,
    pixels_per_image: int = 4096,
    components: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """The report as a dict (JSON-ready): target metrics, source metrics, Bias(l) vs label-free bias."""
    num_classes = len(class_names)
    sampler = PixelSampler(pixels_per_image, seed)
    conf = accumulate_confusions(predictor, target_val, num_classes, on_logits=sampler)
    target = {"num_images": conf.num_images, **class_metrics(conf.raw)}
    # Pair mixtures on the target logits with ground truth: the distributions the bias shows in.
    pairs, counts = fit_pair_gmms(*sampler.arrays(), num_classes, k=components, seed=seed)
    free = label_free_bias(pairs, counts)  # (C,)
    bias = _none_to_nan(target["bias"])
    present = counts.diagonal() > 0
    free = np.where(present, free, np.nan)
    report: dict[str, Any] = {
        "classes": class_names,
        "target": target,
        "label_free_bias": [None if not np.isfinite(v) else float(v) for v in free],
        "spearman": spearman(bias, free),
    }
    order = [i for i in np.argsort(-np.nan_to_num(bias, nan=0.0)) if np.isfinite(bias[i])]
    report["over_predicted"] = [class_names[i] for i in order if bias[i] > 0][:5]
    report["under_predicted"] = [class_names[i] for i in reversed(order) if bias[i] < 0][:5]
    report["source"] = None
    if source_val is not None:
        source = evaluate(predictor, source_val, class_names)
        report["source"] = {"num_images": source["num_images"], **source["raw"]}
        if report["source"]["miou"] is not None and target["miou"] is not None:
            report["miou_drop"] = report["source"]["miou"] - target["miou"]
    return report


def _source_only_model(
    data: Path,
    checkpoint: Path | None,
    network: str | None,
    iterations: int,
    out: Path,
    seed: int,
    data_overrides: Sequence[str] = (),
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load the given checkpoint, or train a source-only model with the training loop's defaults (and the
    data settings `data_overrides`, "key=value")."""
    if checkpoint is None:
        from training.config import load_config
        from training.datasets import open_domains
        from training.uda.loop import Domains, run_training

        overrides = [f"optim.iterations={iterations}"]
        overrides += [item if item.startswith("data.") else f"data.{item}" for item in data_overrides]
        if network is not None:
            overrides.append(f"model.network={network}")
        cfg = load_config("source-only", None, overrides, seed)
        sets = open_domains(data, cfg.data)
        run_dir = out / "source_only"
        run_training(cfg, Domains(sets["source"], sets["target_train"], sets["target_val"]), run_dir)
        checkpoint = run_dir / "checkpoint.pt"
        trained_here = True
    else:
        trained_here = False
    loaded = load_model(checkpoint, network)
    desc = {"checkpoint": str(checkpoint), "network": loaded.network, "trained_here": trained_here}
    return loaded, desc


def run_diagnose(
    *,
    data: Path,
    out: Path,
    checkpoint: Path | None = None,
    network: str | None = None,
    limit: int = 0,
    iterations: int = 600,
    seed: int = 0,
    threads: int = 2,
    data_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """`blda diagnose`: writes OUT/diagnose.json and OUT/diagnose.png, returns the report. The data are
    read as the checkpoint's data config says (defaults for a plain state dict), with `data_overrides`
    ("key=value") on top."""
    from calibration.classes import CLASS_NAMES
    from training.config import data_config
    from training.evaluation.plots import plot_diagnosis

    torch.set_num_threads(threads)
    loaded, desc = _source_only_model(data, checkpoint, network, iterations, out, seed, data_overrides)
    data_cfg = data_config(loaded.config.get("data"), data_overrides)
    names = list(CLASS_NAMES[: int(getattr(loaded.model, "num_classes", len(CLASS_NAMES)))])
    predictor: Predictor = TorchPredictor(loaded.model)
    if loaded.eval_scale is not None and loaded.eval_scale != 1.0:
        # The scale the training loop evaluates at; logits are upsampled back to the full label size.
        predictor = ResizingPredictor(predictor, scale=loaded.eval_scale)
    desc["input_scale"] = loaded.eval_scale
    report = diagnose(
        predictor,
        load_split(data, "target", "val", limit, data_cfg),
        names,
        source_val=load_split(data, "source", "val", limit, data_cfg),
    )
    report = {"model": desc, "data": str(data), "data_config": dataclasses.asdict(data_cfg), **report}
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plot_diagnosis(report, out / "diagnose.png")
    return report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    target, source = report["target"], report.get("source")
    table = Table(title=f"source-only model on target val ({target['num_images']} images)")
    table.add_column("class")
    if source is not None:
        table.add_column("IoU source val", justify="right")
    table.add_column("IoU target val", justify="right")
    table.add_column("Bias(l) ×100", justify="right")
    table.add_column("label-free bias", justify="right")
    for i, name in enumerate(report["classes"]):
        row = [name]
        if source is not None:
            row.append(_pct(source["iou"][i]))
        free = report["label_free_bias"][i]
        row += [_pct(target["iou"][i]), _pct(target["bias"][i]), "-" if free is None else f"{free:+.3f}"]
        table.add_row(*row)
    row = ["mIoU"]
    if source is not None:
        row.append(_pct(source["miou"]))
    row += [_pct(target["miou"]), "", ""]
    table.add_row(*row, style="bold")
    console = Console()
    console.print(table)
    rho = report["spearman"]["rho"]
    console.print(
        f"Spearman ρ(Bias(l), label-free bias) = {'-' if rho is None else f'{rho:.3f}'} "
        f"over {report['spearman']['classes_used']} classes; "
        f"over-predicted: {', '.join(report['over_predicted']) or '-'}; "
        f"under-predicted: {', '.join(report['under_predicted']) or '-'}"
    )
    if "miou_drop" in report:
        console.print(f"source val → target val mIoU drop: {100 * report['miou_drop']:.1f} points")
