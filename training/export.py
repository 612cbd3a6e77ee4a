"""Export a trained network to a bundle: ONNX model (checked, parity-tested against torch), calibration
tables and manifest, written with calibration.bundle.save_bundle into models/<name>/<version>/."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibration.bias import calibration_default
from calibration.bundle import (
    SCHEMA_VERSION,
    CalibrationSpec,
    ClassInfo,
    InputSpec,
    Manifest,
    OutputSpec,
    Provenance,
    save_bundle,
)
from calibration.classes import CLASSES
from calibration.refit import RefitConfig
from calibration.tables import CalibrationTables, pit_check
from training.config import DataConfig
from training.datasets import load_split, open_split
from training.evaluation.evaluate import accumulate_confusions
from training.evaluation.predictors import Predictor, ResizingPredictor, TorchPredictor
from training.models import ExportError, LoadedModel, load_model, untrained_model
from training.networks import IMAGE_MEAN, IMAGE_STD, OUTPUT_STRIDE
from training.tables import PixelSampler, fit_serving_tables

OPSET = 17
# Trace at a size and batch that no parity check uses, so the checks also prove the axes are dynamic.
TRACE_SHAPE = (1, 3, 64, 96)
PARITY_SIZES: tuple[tuple[int, int], ...] = ((96, 160), (128, 256))
PARITY_BATCH = 2
PARITY_TOLERANCE = 1e-3  # max |torch - onnxruntime| in logit units
# Inputs the service resizes to: the benchmark's image size times the training loop's evaluation scale
# (what the model saw), unless given; sides stay multiples of the networks' largest stride (32).
BENCHMARK_IMAGE_SIZE = (256, 512)
DEFAULT_INPUT_SIZE = (128, 256)
MULTIPLE_OF = 32


class LogitsOnly(nn.Module):
    """The served graph: image -> logits (the CDF head is a training signal, not a service output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C, h, w)
        return self.model(image).logits


def to_onnx(model: nn.Module, opset: int = OPSET) -> bytes:
    """ONNX bytes with input "image" (N, 3, H, W) and output "logits" (N, C, h, w), N, H, W dynamic."""
    wrapped = LogitsOnly(model).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # dynamo=False: the TorchScript exporter honours dynamic_axes through the interpolations (the
        # parity checks at other sizes and batch verify it); silence its deprecation warning.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapped,
            (torch.zeros(TRACE_SHAPE),),
            path,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "h", 3: "w"},
            },
            opset_version=opset,
            dynamo=False,
        )
        return path.read_bytes()


def check_onnx(model_bytes: bytes) -> None:
    import onnx

    try:
        proto = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # the checker raises several unrelated types
        raise ExportError(f"model.onnx: expected a valid ONNX model, got: {exc}") from exc
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != ["image"] or outputs != ["logits"]:
        raise ExportError(
            f"model.onnx: expected input ['image'] and output ['logits'], got {inputs} and {outputs}"
        )


def parity_errors(
    model: nn.Module,
    model_bytes: bytes,
    sizes: Sequence[tuple[int, int]] = PARITY_SIZES,
    batch: int = PARITY_BATCH,
    seed: int = 0,
) -> dict[str, float]:
    """Max |torch - onnxruntime| of the logits on random inputs, per "NxHxW"."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    wrapped = LogitsOnly(model).eval()
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for height, width in sizes:
        x = torch.randn((batch, 3, height, width), generator=gen)
        with torch.no_grad():
            expected = wrapped(x).numpy()
        (got,) = session.run(["logits"], {"image": x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"model.onnx: expected logits of shape {expected.shape}, got {got.shape}")
        errors[f"{batch}x{height}x{width}"] = float(np.max(np.abs(got - expected)))
    return errors


def export_checked(model: nn.Module, tolerance: float = PARITY_TOLERANCE) -> tuple[bytes, dict[str, float]]:
    """Export, run the ONNX checker and the parity test; raise ExportError above `tolerance`."""
    model_bytes = to_onnx(model)
    check_onnx(model_bytes)
    errors = parity_errors(model, model_bytes)
    worst = max(errors.values())
    if not worst <= tolerance:
        raise ExportError(f"model.onnx: expected torch/onnxruntime parity within {tolerance}, got {errors}")
    return model_bytes, errors


@dataclass(frozen=True)
class ExportSpec:
    name: str
    version: str
    network: str
    trained: bool
    description: str = ""
    input_size: tuple[int, int] | None = DEFAULT_INPUT_SIZE
    tau: float = 0.2
    calibrate_default: bool = False
    source_domain: str = ""
    target_domain: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # name -> calibration.calibrators Calibrator (calibrators.json); None: a bundle without the file.
    calibrators: dict[str, Any] | None = None
    default_calibrator: str | None = None
    tuning_table: list[dict[str, Any]] = field(default_factory=list)


def build_manifest(spec: ExportSpec, num_classes: int, tables: CalibrationTables | None) -> Manifest:
    if num_classes != len(CLASSES):
        raise ExportError(f"num_classes: expected {len(CLASSES)} (the Cityscapes classes), got {num_classes}")
    calibration = None
    if tables is not None:
        calibration = CalibrationSpec(
            enabled_default=spec.calibrate_default,
            tau_default=spec.tau,
            eps=tables.eps,
            num_knots=int(tables.shifts.delta.shape[-1]),
            source_domain=spec.source_domain,
            target_domain=spec.target_domain,
            calibrators=list(spec.calibrators) if spec.calibrators is not None else None,
            default_calibrator=spec.default_calibrator,
            tuning_table=spec.tuning_table,
        )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        name=spec.name,
        version=spec.version,
        description=spec.description,
        classes=[ClassInfo(id=c.train_id, name=c.name, color=c.color) for c in CLASSES],
        input=InputSpec(
            mean=IMAGE_MEAN, std=IMAGE_STD, pixel_scale=255.0, size=spec.input_size, multiple_of=MULTIPLE_OF
        ),
        output=OutputSpec(num_classes=num_classes, stride=OUTPUT_STRIDE),
        calibration=calibration,
        provenance=Provenance(
            trained=spec.trained,
            network=spec.network,
            config=spec.config,
            data=spec.data,
            metrics=spec.metrics,
        ),
    )


def export_bundle(
    model: nn.Module,
    spec: ExportSpec,
    models_dir: str | Path,
    tables: CalibrationTables | None,
    tolerance: float = PARITY_TOLERANCE,
) -> tuple[Path, dict[str, float]]:
    """Check, then write the bundle; returns its directory and the parity errors (also in the manifest)."""
    num_classes = int(getattr(model, "num_classes", len(CLASSES)))
    model_bytes, errors = export_checked(model, tolerance)
    metrics = {**spec.metrics, "onnx_parity_max_abs": errors}
    manifest = build_manifest(
        ExportSpec(**{**spec.__dict__, "metrics": metrics}),
        num_classes,
        tables,
    )
    calibrators = spec.calibrators if tables is not None else None
    return save_bundle(models_dir, model_bytes, tables, manifest, calibrators), errors


def run_export(
    *,
    out: Path,
    name: str,
    version: str,
    checkpoint: Path | None = None,
    network: str | None = None,
    untrained: bool = False,
    teacher: bool = False,
    data: Path | None = None,
    limit: int = 200,
    input_size: tuple[int, int] | str | None = "auto",
    taus: Sequence[float] = (0.1, 0.2, 0.4),
    tolerance: float = PARITY_TOLERANCE,
    metrics_file: Path | None = None,
    description: str = "",
    seed: int = 0,
    threads: int = 2,
    tables_from_checkpoint: bool = False,
    refit: RefitConfig = RefitConfig(),
    data_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """`blda export`: returns a summary (bundle path, parity errors, sizes, where the tables came from).

    With `data`, the serving tables are refitted on the final model's eval-mode logits (after AdaBN) and
    τ and the bundle's calibration default are chosen on the target tuning split: calibration is on by
    default only when it raised tuning mIoU there. Without `data` (or with `tables_from_checkpoint`), the
    checkpoint's training-time GMM tables ship, off by default (nothing justifies turning them on).
    The data are read as the checkpoint's data config says (defaults when unknown), with `data_overrides`
    ("key=value") on top."""
    import json

    from training.config import data_config

    torch.set_num_threads(threads)
    if untrained:
        if checkpoint is not None:
            raise ExportError("expected either --untrained or --checkpoint, got both")
        if network is None:
            raise ExportError("--untrained: expected --network NAME")
        loaded = LoadedModel(
            untrained_model(network, seed=seed), network, trained=False, config={"seed": seed}
        )
    else:
        if checkpoint is None:
            raise ExportError("expected --checkpoint CKPT (or --untrained --network NAME)")
        loaded = load_model(checkpoint, network, teacher)
    stored = loaded.config.get("data")
    data_cfg = data_config(stored if isinstance(stored, dict) else None, data_overrides)
    if isinstance(input_size, str):
        if input_size != "auto":
            raise ExportError(f"input size: expected HxW, 'none' or 'auto', got {input_size!r}")
        input_size = auto_input_size(loaded, data, data_cfg)
    tables, tables_from = loaded.tables, "checkpoint GMM state" if loaded.tables is not None else "none"
    fitted: dict[str, Any] | None = None
    default_calibrator: str | None = None
    tuning_table: list[dict[str, Any]] = []
    data_desc: dict[str, Any] = {}
    choice: dict[str, Any] = {"enabled": False, "tau": float(taus[0]) if taus else 0.2}
    if data is not None and not (tables_from_checkpoint and tables is not None):
        source = load_split(data, "source", "train", limit, data_cfg)
        target = load_split(data, "target", "train", limit, data_cfg)
        tables, report = fit_serving_tables(predictor_for(loaded), source, target, replace(refit, seed=seed))
        kept = (
            ""
            if refit.keep_fraction >= 1
            else f", the most confident {refit.keep_fraction:.0%} of each class"
        )
        tables_from = (
            f"refitted on {data}: eval-mode logits of source train (labels) and target train (argmax "
            f"pseudo-labels{kept}); rows kept from source: {[int(c) for c in np.flatnonzero(report.fallback_rows)]}"
        )
    if data is not None and tables is not None and len(open_split(data, "target", "tuning", data_cfg)) > 0:
        tuning = load_split(data, "target", "tuning", 0, data_cfg)
        choice = choose_calibration(predictor_for(loaded), tuning, tables, taus)
        from training.evaluation.calibrators import compare_calibrators

        # Every calibrator, fitted and measured on the tuning split; the bundle serves the best one there.
        compared = compare_calibrators(
            predictor_for(loaded),
            data,
            ["all"],
            tables,
            split="tuning",
            fit_limit=min(limit, 100) if limit > 0 else 100,
            data_cfg=data_cfg,
            cost=False,
            blda_taus=taus,
        )
        fitted = compared.fitted
        default_calibrator = compared.default
        tuning_table = compared.rows["tuning"]
        if "blda" in fitted and fitted["blda"].tau is not None:
            choice["tau"] = fitted["blda"].tau
        choice["enabled"] = default_calibrator != "none"
        choice["default_calibrator"] = default_calibrator
    elif data is not None and tables is not None:
        choice["reason"] = "no target tuning images to measure it on: off by default"
    elif tables is not None:
        choice["reason"] = "no data to measure it on: off by default"
    if data is not None:
        data_desc["root"] = str(data)
    if isinstance(loaded.config.get("data"), dict):
        data_desc["config"] = loaded.config["data"]
    metrics = dict(loaded.metrics)
    metrics["calibration_choice"] = choice
    if metrics_file is not None:
        if not metrics_file.is_file():
            raise FileNotFoundError(
                f"{metrics_file}: expected a metrics.json from `blda evaluate`, got no such file"
            )
        metrics["evaluation"] = json.loads(metrics_file.read_text(encoding="utf-8"))
    config = dict(loaded.config)
    if checkpoint is not None:
        config["checkpoint"] = str(checkpoint)
    if loaded.iteration is not None:
        config["iteration"] = loaded.iteration
    config["weights"] = "teacher" if teacher else ("random init" if untrained else "student")
    spec = ExportSpec(
        name=name,
        version=version,
        network=loaded.network,
        trained=loaded.trained,
        description=description or ("UNTRAINED: random weights, for wiring tests only" if untrained else ""),
        input_size=input_size,
        tau=choice["tau"],
        calibrate_default=bool(choice["enabled"]),
        source_domain=f"{data_cfg.source} ({data_cfg.source_format} layout)" if tables is not None else "",
        target_domain=f"{data_cfg.target} ({data_cfg.target_format} layout)" if tables is not None else "",
        config=_jsonable(config),
        data=_jsonable(data_desc),
        metrics=_jsonable(metrics),
        calibrators=fitted,
        default_calibrator=default_calibrator,
        tuning_table=_jsonable(tuning_table),
    )
    bundle, errors = export_bundle(loaded.model, spec, out, tables, tolerance)
    return {
        "bundle": str(bundle),
        "network": loaded.network,
        "trained": loaded.trained,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "onnx_mb": round((bundle / "model.onnx").stat().st_size / 1e6, 3),
        "parity_max_abs": errors,
        "calibration_tables": tables_from,
        "calibration_choice": {k: v for k, v in choice.items() if k != "pit"},
    }


def predictor_for(loaded: LoadedModel) -> Predictor:
    """The model as the training loop evaluates it: images resized by its evaluation scale."""
    predictor: Predictor = TorchPredictor(loaded.model)
    if loaded.eval_scale is not None and loaded.eval_scale != 1.0:
        predictor = ResizingPredictor(predictor, scale=loaded.eval_scale)
    return predictor


def choose_calibration(
    predictor: Predictor, tuning: Iterable[Any], tables: CalibrationTables, taus: Sequence[float]
) -> dict[str, Any]:
    """τ with the best tuning-split mIoU, and whether it beats raw there (the bundle's default); the PIT
    check of the tables on the tuning split's labelled pixels."""
    sampler = PixelSampler(4096, seed=7)
    conf = accumulate_confusions(predictor, tuning, tables.num_classes, tables, list(taus), sampler)
    choice = calibration_default(conf.raw, conf.calibrated)
    logits, labels = sampler.arrays()
    return {
        "split": "tuning",
        "images": conf.num_images,
        **{k: v for k, v in choice.items() if k != "summary"},
        "reason": f"{choice['summary']} on the target tuning split",
        "pit": pit_check(logits[:, 0, :], labels[0], tables).to_dict(),
    }


def auto_input_size(
    loaded: LoadedModel, data: Path | None, data_cfg: DataConfig | None = None
) -> tuple[int, int]:
    """The size the model was evaluated at in training: the data's image size (the first target val
    image under `data`, else the benchmark's default) times the evaluation scale, rounded to a multiple of
    MULTIPLE_OF."""
    height, width = BENCHMARK_IMAGE_SIZE
    if data is not None:
        first = next(iter(load_split(data, "target", "val", 1, data_cfg)), None)
        if first is not None:
            height, width = first.image.shape[:2]
    scale = loaded.eval_scale if loaded.eval_scale is not None else DataConfig().eval_scale
    return tuple(  # type: ignore[return-value]
        max(MULTIPLE_OF, MULTIPLE_OF * round(side * scale / MULTIPLE_OF)) for side in (height, width)
    )


def _jsonable(value: Any) -> Any:
    """Dicts from checkpoints may hold tensors, arrays, paths or tuples: make them JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
