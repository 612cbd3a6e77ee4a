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
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from calibration.alignment import calibrated_decision
from calibration.bias import bias_from_confusion, confusion_matrix, iou_from_confusion
from calibration.labels import IGNORE_INDEX
from calibration.tables import CalibrationTables
from training.networks import normalise_images


class LabelledSample(Protocol):
    """What the data loaders yield (training.data's Sample)."""

    @property
    def image(self) -> np.ndarray: ...  # (H, W, 3) uint8

    @property
    def label(self) -> np.ndarray: ...  # (H, W) uint8 train ids, 255 = ignore

    @property
    def name(self) -> str: ...


# uint8 images (N, H, W, 3) -> float32 logits (N, C, h, w)
Predictor = Callable[[np.ndarray], np.ndarray]


class TorchPredictor:
    """Runs a torch segmentation network (eval mode, no grad) on uint8 images."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8
        x = torch.from_numpy(normalise_images(images)).to(self.device)
        with torch.no_grad():
            return self.model(x).logits.float().cpu().numpy()


class OnnxPredictor:
    """Runs an exported model.onnx with onnxruntime, normalising as its manifest says."""

    def __init__(
        self,
        model_path: str | Path,
        mean: Sequence[float],
        std: Sequence[float],
        pixel_scale: float = 255.0,
        threads: int = 2,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting between ops: on a shared machine spinning threads steal the cores they wait for.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.pixel_scale = np.float32(pixel_scale)

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / self.pixel_scale  # (N, 3, H, W)
        x = np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)
        (logits,) = self.session.run(["logits"], {"image": x})
        return np.asarray(logits, dtype=np.float32)


class ResizingPredictor:
    """Resizes uint8 images (bilinear, as training does) before the model: to a fixed (H, W) as the
    service does with the manifest's input size, or by a factor as the training loop's evaluation does."""

    def __init__(
        self, inner: Predictor, size: tuple[int, int] | None = None, scale: float | None = None
    ) -> None:
        if (size is None) == (scale is None):
            raise ValueError("expected exactly one of size or scale")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale: expected > 0, got {scale}")
        self.inner = inner
        self.size = size
        self.scale = scale

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        assert self.scale is not None
        return max(1, round(height * self.scale)), max(1, round(width * self.scale))

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8
        from PIL import Image

        h, w = self.target_size(images.shape[1], images.shape[2])
        if (h, w) != images.shape[1:3]:
            images = np.stack(
                [np.asarray(Image.fromarray(i).resize((w, h), Image.Resampling.BILINEAR)) for i in images]
            )
        return self.inner(images)


def upsample_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, h, w) -> (N, C, H, W), bilinear with half-pixel centres (as the networks' own upsampling)."""
    if logits.shape[-2:] == size:
        return logits
    t = F.interpolate(torch.from_numpy(logits), size=size, mode="bilinear", align_corners=False)
    return t.numpy()


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


def accumulate_confusions(
    predictor: Predictor,
    samples: Iterable[LabelledSample],
    num_classes: int,
    tables: CalibrationTables | None = None,
    taus: Sequence[float] = (),
    on_logits: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Confusions:
    """One pass over the samples (one image at a time: sizes may differ). Logits are upsampled to the
    label size before both the raw argmax and the calibrated decision, so the two see the same logits.
    `on_logits(logits (C, H, W), label (H, W))` lets a caller collect logits in the same pass."""
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
        up = upsample_logits(logits, (label.shape[0], label.shape[1]))[0]  # (C, H, W)
        raw += confusion_matrix(up.argmax(0), label, num_classes, IGNORE_INDEX)
        for tau, conf in cal.items():
            assert tables is not None
            conf += confusion_matrix(
                calibrated_decision(up, tables.shifts, tau), label, num_classes, IGNORE_INDEX
            )
        if on_logits is not None:
            on_logits(up, label)
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
    samples: Iterable[LabelledSample],
    sampler: PixelSampler,
    pseudo_labels: bool = False,
) -> int:
    """Feed every sample's logits (at its image size) to `sampler`, labelled by the ground truth or, with
    `pseudo_labels`, by the model's own argmax (for an unlabelled target domain). Returns the image count."""
    count = 0
    for sample in samples:
        image = np.asarray(sample.image)
        logits = upsample_logits(predictor(image[None]), (image.shape[0], image.shape[1]))[0]  # (C, H, W)
        label = logits.argmax(0).astype(np.uint8) if pseudo_labels else np.asarray(sample.label)
        sampler(logits, label)
        count += 1
    return count


# Sub-folders of a data root as `blda synth` writes them (and where real datasets go): the source domain in
# the GTA5 layout (train and a held-out val), the target domain in the Cityscapes layout (train/val splits).
SOURCE_DIRS = {"train": "source", "val": "source_val"}
TARGET_DIR = "target"


def load_split(data: Path, domain: str, split: str, limit: int = 0) -> Iterable[LabelledSample]:
    """Samples of `domain` ("source" or "target") and `split` under `data`; at most `limit` (0: all)."""
    from training.data.datasets import CityscapesDataset, Gta5Dataset

    dataset: Any
    if domain == "source":
        if split not in SOURCE_DIRS:
            raise ValueError(f"split: expected one of {sorted(SOURCE_DIRS)} for the source, got {split!r}")
        dataset = Gta5Dataset(Path(data) / SOURCE_DIRS[split])
    elif domain == "target":
        dataset = CityscapesDataset(Path(data) / TARGET_DIR, split)
    else:
        raise ValueError(f"domain: expected 'source' or 'target', got {domain!r}")
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    return (dataset[i] for i in range(count))


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
    by the checkpoint's evaluation scale (data.eval_scale), else not at all."""
    from training.data.classes import CLASS_NAMES

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
    from training.export import load_model

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
) -> dict[str, Any]:
    """`blda evaluate`: writes OUT/metrics.json and OUT/metrics.png, returns the metrics."""
    import json

    from training.evaluation.plots import plot_evaluation

    torch.set_num_threads(threads)
    mut, _ = open_model(checkpoint, bundle, network, teacher, threads, input_scale)
    tables, tables_from = mut.tables, ("bundle" if bundle is not None else "checkpoint GMM state")
    if tables is None and taus:
        # Post-hoc calibration of a model trained without GMMs (e.g. source-only): tables from its own
        # logits on the training splits (target with pseudo-labels: the evaluation labels are never used).
        from training.export import fit_tables_offline

        tables = fit_tables_offline(
            mut.predictor,
            load_split(data, "source", "train", fit_limit),
            load_split(data, "target", "train", fit_limit),
            len(mut.class_names),
        )
        tables_from = f"fitted offline on {data} train splits ({fit_limit} images per domain)"
    target = evaluate(mut.predictor, load_split(data, "target", split, limit), mut.class_names, tables, taus)
    metrics: dict[str, Any] = {
        "model": mut.description,
        "data": str(data),
        "split": split,
        "taus": [float(t) for t in taus],
        "calibration_tables": tables_from,
        "target": target,
    }
    if with_source:
        metrics["source"] = evaluate(mut.predictor, load_split(data, "source", split, limit), mut.class_names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plot_evaluation({**target, "classes": mut.class_names}, out / "metrics.png")
    return metrics
