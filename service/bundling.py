"""`blda bundle create`: any ONNX segmentation model, and optionally image folders, become a served bundle.

torch-free (onnxruntime, numpy, PIL), so that it runs from a serving install. The model is run exactly as
the service runs it (service.imaging's resize and normalisation, the manifest's graph names); the tables
come from the core's one refit function (calibration.refit.refit_tables), fed as the exporter feeds it
(training/tables.py): logits sampled at label resolution (bilinear, half-pixel centres, evaluated only at
the sampled pixels so memory stays bounded), source pairs from labels, target pairs from confident
pseudo-labels, thin target rows falling back to the source rows.

Every bad input is a :class:`calibration.bundle.BundleError` naming the file and the field (or option).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from calibration.bundle import (
    SCHEMA_VERSION,
    BundleError,
    CalibrationSpec,
    ClassInfo,
    InputSpec,
    Manifest,
    OutputSpec,
    Provenance,
    save_bundle,
    sniff_model_file,
)
from calibration.labels import IGNORE_INDEX
from calibration.logits import not_logits_reason
from calibration.refit import RefitConfig, RefitReport, refit_tables
from calibration.tables import CalibrationTables, pit_check
from service.imaging import Normalisation, model_input_size, preprocess, resize_nearest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LABEL_FORMATS = ("train-ids", "cityscapes-ids")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Every HOLDOUT_EVERY-th target image (with labels) is held out from the refit to choose the default.
HOLDOUT_EVERY = 5

# Called once per image processed (a progress bar).
Advance = Callable[[], None]


@dataclass(frozen=True)
class GraphInfo:
    """What the ONNX graph says about its input and output (dimensions: int, or a name when dynamic)."""

    input_name: str
    output_name: str
    input_shape: tuple[int | str | None, ...]
    output_shape: tuple[int | str | None, ...]
    producer: str

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph fixes them, None when they are dynamic."""
        h, w = self.input_shape[2], self.input_shape[3]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def dynamic_axes(self) -> dict[str, list[int]]:
        return {
            "input": [i for i, d in enumerate(self.input_shape) if not isinstance(d, int)],
            "output": [i for i, d in enumerate(self.output_shape) if not isinstance(d, int)],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": {"name": self.input_name, "shape": list(self.input_shape), "layout": "NCHW"},
            "output": {"name": self.output_name, "shape": list(self.output_shape), "layout": "NCHW"},
            "dynamic_axes": self.dynamic_axes(),
            "producer": self.producer,
        }


def _pick(kind: str, available: Sequence[str], wanted: str | None, path: Path) -> str:
    if wanted is not None:
        if wanted not in available:
            raise BundleError(
                path,
                f"--{kind}-name",
                f"expected one of the graph's {kind}s {list(available)}, got {wanted!r}",
            )
        return wanted
    if len(available) != 1:
        raise BundleError(
            path,
            f"--{kind}-name",
            f"expected one {kind} or --{kind}-name NAME, got {kind}s {list(available)}",
        )
    return available[0]


def read_graph(session: Any, path: Path, input_name: str | None, output_name: str | None) -> GraphInfo:
    """The graph's input and output, checked: one float32 (N, 3, H, W) input, one 4-D output."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    name_in = _pick("input", list(inputs), input_name, path)
    name_out = _pick("output", list(outputs), output_name, path)
    node = inputs[name_in]
    shape = tuple(d if isinstance(d, int) else (d or None) for d in node.shape)
    if node.type != "tensor(float)":
        raise BundleError(path, f"input {name_in!r}", f"expected a float32 input, got {node.type}")
    if len(shape) != 4:
        raise BundleError(
            path, f"input {name_in!r}", f"expected a 4-D input (N, 3, H, W), got shape {list(shape)}"
        )
    if shape[1] != 3:
        looks = " (NHWC: put the transpose in the graph)" if shape[3] == 3 else ""
        raise BundleError(
            path,
            f"input {name_in!r}",
            f"expected the NCHW layout (N, 3, H, W), got shape {list(shape)}{looks}",
        )
    out = outputs[name_out]
    out_shape = tuple(d if isinstance(d, int) else (d or None) for d in out.shape)
    if out.type != "tensor(float)":
        raise BundleError(path, f"output {name_out!r}", f"expected float32 logits, got {out.type}")
    if len(out_shape) != 4:
        raise BundleError(
            path, f"output {name_out!r}", f"expected 4-D logits (N, C, H', W'), got shape {list(out_shape)}"
        )
    meta = session.get_modelmeta()
    return GraphInfo(name_in, name_out, shape, out_shape, str(meta.producer_name or "unknown producer"))


class Runner:
    """The model as the service runs it: resize to the manifest's input size, normalise, one image."""

    def __init__(self, session: Any, graph: GraphInfo, spec: InputSpec) -> None:
        self.session = session
        self.graph = graph
        self.spec = spec
        self.norm = Normalisation.from_spec(spec.mean, spec.std, spec.pixel_scale)

    def run_tensor(self, x: np.ndarray) -> np.ndarray:  # (N, 3, H, W) -> (N, C, h, w)
        (logits,) = self.session.run([self.graph.output_name], {self.graph.input_name: x})
        return np.asarray(logits, dtype=np.float32)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the model sees for an image of that size (the manifest's input size rules)."""
        return model_input_size(height, width, self.spec.size, self.spec.multiple_of)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:  # (H, W, 3) uint8 -> (C, h, w)
        return self.run_tensor(preprocess(rgb, self.input_size(rgb.shape[0], rgb.shape[1]), self.norm))[0]


def probe(runner: Runner, path: Path) -> tuple[int, int]:
    """(classes, stride) by running the model once on a random image; refuses probabilities."""
    spec = runner.spec
    # Unequal sides, so that a stride that differs between them (a wrong layout) shows.
    height, width = spec.size if spec.size is not None else (4 * spec.multiple_of, 6 * spec.multiple_of)
    x = np.random.default_rng(0).normal(0.0, 1.0, (1, 3, height, width)).astype(np.float32)
    name = runner.graph.output_name
    try:
        logits = runner.run_tensor(x)
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        raise BundleError(
            path, "", f"expected a model that runs on (1, 3, {height}, {width}), got: {exc}"
        ) from None
    if logits.ndim != 4 or logits.shape[0] != 1:
        raise BundleError(
            path, f"output {name!r}", f"expected logits (1, C, h, w), got {tuple(logits.shape)}"
        )
    c, h, w = logits.shape[1:]
    stride = max(1, round(height / h))
    # The service checks sides of -(-H // stride); floor is accepted too (a valid-padding network).
    fits = all(size // stride <= out <= -(-size // stride) for size, out in ((height, h), (width, w)))
    if not fits or c < 2:
        raise BundleError(
            path,
            f"output {name!r}",
            f"expected logits (1, C >= 2, H/s, W/s) for the input (1, 3, {height}, {width}) at one stride s, "
            f"got {tuple(logits.shape)}",
        )
    reason = not_logits_reason(logits, channel_axis=1)
    if reason is not None:
        raise BundleError(path, f"output {name!r}", f"expected logits (unnormalised scores), {reason}")
    return int(c), int(stride)


def class_infos(classes: str | None, num_classes: int) -> list[ClassInfo]:
    """--classes cityscapes | FILE.json (names, or {"name", "color"} objects, or {"classes": [...]});
    default: class0..class{C-1} with a fixed palette."""
    if classes is None:
        colors = np.random.default_rng(0).integers(0, 256, (num_classes, 3))
        return [
            ClassInfo(id=i, name=f"class{i}", color=tuple(colors[i].tolist())) for i in range(num_classes)
        ]
    if classes == "cityscapes":
        from calibration.classes import CLASSES

        infos = [ClassInfo(id=c.train_id, name=c.name, color=c.color) for c in CLASSES]
        source: str | Path = "--classes cityscapes"
    else:
        path = Path(classes)
        source = path
        if not path.is_file():
            raise BundleError(
                path, "--classes", "expected 'cityscapes' or an existing JSON file, got no such file"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(path, "", f"expected JSON, got unparsable text ({exc})") from None
        if isinstance(raw, dict):
            raw = raw.get("classes")
        if not isinstance(raw, list):
            raise BundleError(path, "classes", "expected a list of class names or {name, color} objects")
        colors = np.random.default_rng(0).integers(0, 256, (len(raw), 3))
        infos = []
        for i, entry in enumerate(raw):
            item = {"name": entry} if isinstance(entry, str) else entry
            if not isinstance(item, dict) or "name" not in item:
                raise BundleError(
                    path, f"classes[{i}]", f"expected a name or a {{name, color}} object, got {entry!r}"
                )
            try:
                infos.append(
                    ClassInfo(id=i, name=item["name"], color=tuple(item.get("color", colors[i].tolist())))
                )
            except (ValueError, TypeError) as exc:
                raise BundleError(path, f"classes[{i}]", str(exc).splitlines()[-1].strip()) from None
    if len(infos) != num_classes:
        raise BundleError(
            source,
            "classes",
            f"expected {num_classes} classes (the model's output channels), got {len(infos)}",
        )
    return infos


def classes_cityscapes() -> tuple[Any, ...]:
    from calibration.classes import CLASSES

    return CLASSES


def list_images(directory: Path, option: str) -> list[Path]:
    if not directory.is_dir():
        raise BundleError(directory, option, "expected a directory of images, got no such directory")
    images = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BundleError(directory, option, f"expected images ({', '.join(IMAGE_SUFFIXES)}), got none")
    return images


def label_path(image: Path, images_dir: Path, labels_dir: Path, option: str) -> Path:
    """The label PNG of an image: the same relative path and stem below the labels folder."""
    relative = image.relative_to(images_dir).with_suffix(".png")
    path = labels_dir / relative
    if not path.is_file():
        raise BundleError(path, option, f"expected the label PNG of {image}, got no such file")
    return path


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BundleError(path, "", f"expected an image PIL can read, got: {exc}") from None


def read_label(path: Path, shape: tuple[int, int], label_format: str, num_classes: int) -> np.ndarray:
    """(H, W) uint8 train ids in [0, C) or IGNORE_INDEX."""
    try:
        with Image.open(path) as image:
            label = np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BundleError(path, "", f"expected a label PNG, got: {exc}") from None
    if label.ndim != 2:
        raise BundleError(
            path, "", f"expected a single-channel label PNG of class ids, got shape {label.shape}"
        )
    if label.shape != shape:
        raise BundleError(path, "", f"expected the image's size {shape}, got {label.shape}")
    if label_format == "cityscapes-ids":
        from calibration.classes import LABEL_TO_TRAIN

        if label.max(initial=0) > 255:
            raise BundleError(path, "", f"expected Cityscapes label ids (0..33), got {int(label.max())}")
        label = LABEL_TO_TRAIN[label.astype(np.int64)]
    bad = (label != IGNORE_INDEX) & (label >= num_classes)
    if bad.any():
        raise BundleError(
            path,
            "--label-format",
            f"expected {label_format} in [0, {num_classes}) or {IGNORE_INDEX}, got {int(label[bad].flat[0])}",
        )
    return label.astype(np.uint8)


def sample_bilinear(
    logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """The logits (C, h, w) upsampled to ``size`` (H, W), bilinear with half-pixel centres (torch's
    align_corners=False, as the exporter's upsample_logits), evaluated only at pixels (rows, cols):
    (C, P). Never builds the (C, H, W) array."""
    h, w = logits.shape[1:]
    big_h, big_w = size

    def axis(index: np.ndarray, small: int, big: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((index + 0.5) * (small / big) - 0.5, 0.0)  # torch clamps negative sources to 0
        lo = np.minimum(src.astype(np.int64), small - 1)
        hi = np.minimum(lo + 1, small - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = axis(rows, h, big_h)
    x0, x1, wx = axis(cols, w, big_w)
    top = logits[:, y0, x0] * (1 - wx) + logits[:, y0, x1] * wx
    bottom = logits[:, y1, x0] * (1 - wx) + logits[:, y1, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


class PixelSampler:
    """A random subset of (logits, label) pixels per image at label resolution (training.tables'
    PixelSampler without torch): memory grows with pixels_per_image, not with the images' size."""

    def __init__(self, pixels_per_image: int, seed: int) -> None:
        self.pixels_per_image = pixels_per_image
        self.rng = np.random.default_rng(seed)
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray, size: tuple[int, int], label: np.ndarray | None) -> None:
        flat = label.reshape(-1) if label is not None else None
        valid = np.flatnonzero(flat != IGNORE_INDEX) if flat is not None else np.arange(size[0] * size[1])
        if valid.size > self.pixels_per_image:
            valid = self.rng.choice(valid, self.pixels_per_image, replace=False)
        rows, cols = np.divmod(valid, size[1])
        self.logits.append(sample_bilinear(logits, rows, cols, size))  # (C, P)
        self.labels.append(flat[valid] if flat is not None else np.zeros(valid.size, np.uint8))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """logits (C, 1, P) and labels (1, P): the (C, H, W) layout calibration.distributions expects."""
        logits = np.concatenate(self.logits, axis=1)
        return logits[:, None, :], np.concatenate(self.labels)[None, :]


@dataclass(frozen=True)
class Folders:
    source_images: Path | None = None
    source_labels: Path | None = None
    target_images: Path | None = None
    target_labels: Path | None = None
    label_format: str = "train-ids"

    def check(self) -> bool:
        """True when calibration is asked for; the folders must come together."""
        given = {
            "--source-images": self.source_images,
            "--source-labels": self.source_labels,
            "--target-images": self.target_images,
        }
        if all(v is None for v in given.values()):
            if self.target_labels is not None:
                raise BundleError(
                    str(self.target_labels), "--target-labels", "expected --target-images with it"
                )
            return False
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise BundleError(
                "command line",
                missing[0],
                "expected --source-images, --source-labels and --target-images together "
                f"(labelled source pixels give the source pairs and anchors, target images the shifts), "
                f"missing {', '.join(missing)}",
            )
        if self.label_format not in LABEL_FORMATS:
            raise BundleError(
                "command line",
                "--label-format",
                f"expected one of {list(LABEL_FORMATS)}, got {self.label_format!r}",
            )
        return True


@dataclass(frozen=True)
class CalibrationResult:
    tables: CalibrationTables
    report: RefitReport
    choice: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    # Every calibrator fitted, measured on the held-out target images, and the best there (or none); empty
    # without held-out labelled target images (the bundle then serves none and blda, as before).
    calibrators: dict[str, Any] = field(default_factory=dict)
    default_calibrator: str | None = None
    tuning_table: list[dict[str, Any]] = field(default_factory=list)


def fit_calibration(
    runner: Runner,
    folders: Folders,
    num_classes: int,
    refit: RefitConfig,
    taus: Sequence[float],
    pixels_per_image: int,
    advance: Advance,
) -> CalibrationResult:
    """Tables from the folders (as `blda export` fits them) and the default, chosen on held-out target
    images when they have labels."""
    assert folders.source_images and folders.source_labels and folders.target_images
    source = list_images(folders.source_images, "--source-images")
    target = list_images(folders.target_images, "--target-images")
    tuning: list[Path] = []
    if folders.target_labels is not None and len(target) >= 2:
        tuning = target[::HOLDOUT_EVERY]
        target = [p for p in target if p not in set(tuning)]
    src = PixelSampler(pixels_per_image, refit.seed)
    for path in source:
        image = read_image(path)
        label_file = label_path(path, folders.source_images, folders.source_labels, "--source-labels")
        label = read_label(label_file, image.shape[:2], folders.label_format, num_classes)
        src(runner(image), image.shape[:2], label)
        advance()
    if not any(lab.size for lab in src.labels):
        raise BundleError(
            folders.source_labels, "--source-labels", "expected labelled pixels, got only ignore (255)"
        )
    tgt = PixelSampler(pixels_per_image, refit.seed + 1)
    for path in target:
        image = read_image(path)
        tgt(runner(image), image.shape[:2], None)  # target labels are never read for the fit
        advance()
    source_logits, source_labels = src.arrays()
    target_logits, _ = tgt.arrays()
    tables, report = refit_tables(target_logits, refit, source_logits, source_labels)
    counts = {
        "source_images_fitted": len(source),
        "target_images_fitted": len(target),
        "target_images_held_out": len(tuning),
    }
    if tuning:
        assert folders.target_labels is not None
        choice = choose_calibration(
            runner,
            tuning,
            folders.target_images,
            folders.target_labels,
            folders.label_format,
            tables,
            taus,
            advance,
        )
        fitted, default, table = fit_calibrators_on(
            runner, tuning, folders, tables, source_logits, source_labels, target_logits, taus
        )
        if "blda" in fitted and fitted["blda"].tau is not None:
            choice["tau"] = fitted["blda"].tau
        choice["enabled"] = default != "none"
        choice["default_calibrator"] = default
        return CalibrationResult(tables, report, choice, counts, fitted, default, table)
    else:
        why = "no target labels" if folders.target_labels is None else "fewer than 2 target images"
        choice = {
            "enabled": False,
            "tau": float(taus[0]) if taus else 0.2,
            "reason": f"{why} to measure it on: off by default (requests may still ask calibrate=true)",
            "pit": None,
        }
    return CalibrationResult(tables, report, choice, counts)


def fit_calibrators_on(
    runner: Runner,
    tuning: Sequence[Path],
    folders: Folders,
    tables: CalibrationTables,
    source_logits: np.ndarray,  # (C, 1, P) labelled source pixels
    source_labels: np.ndarray,  # (1, P)
    target_logits: np.ndarray,  # (C, 1, P) unlabelled target pixels
    taus: Sequence[float],
) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """Every calibrator (calibration.calibrators.fit), strengths and default chosen on the held-out target
    images; the tuning-split table. Without a source validation folder, BCTS fits on the labelled source
    pixels the tables use, and the source priors are theirs."""
    from calibration.calibrators.evaluation import LogitImage, calibrator_confusion, sample_pixels, table_row
    from calibration.calibrators.fit import FitInputs, choose_default, fit_calibrators
    from calibration.calibrators.priors import class_priors
    from calibration.segmentation import DEFAULT_DECISION_SCALE, decision_size

    assert folders.target_images is not None and folders.target_labels is not None
    c = tables.num_classes
    images = []
    for path in tuning:
        image = read_image(path)
        label_file = label_path(path, folders.target_images, folders.target_labels, "--target-labels")
        label = read_label(label_file, image.shape[:2], folders.label_format, c)
        size = image.shape[:2]
        at = decision_size(size, runner.input_size(*size), DEFAULT_DECISION_SCALE)
        images.append(LogitImage(runner(image), label, at))
    labels = source_labels[0].astype(np.int64)
    priors = class_priors(np.bincount(labels, minlength=c)[:c])
    inputs = FitInputs(
        priors, target_logits[:, 0], source_logits[:, 0], labels, images, tables.shifts, blda_taus=taus
    )
    fitted = fit_calibrators(inputs, ["all"])
    pixels = sample_pixels(images, 2048, seed=3)
    rows = [
        table_row(calibrator_confusion(images, cal, tables.shifts, c), cal, tables.shifts, pixels)
        for cal in fitted.values()
    ]
    return fitted, choose_default(rows), rows


def choose_calibration(
    runner: Runner,
    images: Iterable[Path],
    images_dir: Path,
    labels_dir: Path,
    label_format: str,
    tables: CalibrationTables,
    taus: Sequence[float],
    advance: Advance,
) -> dict[str, Any]:
    """τ and the calibration default by the core's rule (calibration.bias.calibration_default, as
    `blda export`), on decisions made as the service makes them (calibration.segmentation); the PIT check
    of the tables on the held-out labelled pixels."""
    from calibration.bias import calibration_default, confusion_matrix
    from calibration.segmentation import DEFAULT_DECISION_SCALE, decide, decision_size

    c = tables.num_classes
    raw = np.zeros((c, c), np.int64)
    cal = {float(t): np.zeros((c, c), np.int64) for t in taus}
    pit = PixelSampler(4096, seed=7)
    count = 0
    for path in images:
        image = read_image(path)
        label = read_label(
            label_path(path, images_dir, labels_dir, "--target-labels"), image.shape[:2], label_format, c
        )
        logits = runner(image)  # (C, h, w)
        size = image.shape[:2]
        # Decided as the service decides (calibration.segmentation), then resized to the label.
        at = decision_size(size, runner.input_size(*size), DEFAULT_DECISION_SCALE)
        made = decide(logits, at, tables.shifts, list(cal))
        raw += confusion_matrix(resize_nearest(made.raw, *size), label, c)
        for tau, pred in zip(cal, made.calibrated, strict=True):
            cal[tau] += confusion_matrix(resize_nearest(pred, *size), label, c)
        pit(logits, size, label)
        count += 1
        advance()

    choice = calibration_default(raw, cal)
    logits_p, labels_p = pit.arrays()
    return {
        "split": f"target held out (every {HOLDOUT_EVERY}th image, not used for the fit)",
        "images": count,
        **{k: v for k, v in choice.items() if k != "summary"},
        "reason": f"{choice['summary']} on the held-out target images",
        "pit": pit_check(logits_p[:, 0, :], labels_p[0], tables).to_dict(),
    }


@dataclass(frozen=True)
class CreateOptions:
    onnx: Path
    name: str
    version: str
    out: Path
    classes: str | None = None
    input_name: str | None = None
    output_name: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pixel_scale: float = 255.0
    size: tuple[int, int] | None = None
    multiple_of: int = 32
    folders: Folders = field(default_factory=Folders)
    taus: tuple[float, ...] = (0.1, 0.2, 0.4)
    pixels_per_image: int = 4096
    refit: RefitConfig = field(default_factory=RefitConfig)
    threads: int = 2
    description: str = ""
    force: bool = False


def create_bundle(options: CreateOptions, progress: Callable[[int], Advance] | None = None) -> dict[str, Any]:
    """Write ``out/name/version/`` from the options; returns a summary. ``progress(total)`` gives the
    callback advanced once per image (a progress bar)."""
    from service.inference import create_session

    o = options
    if not o.onnx.is_file():
        raise BundleError(o.onnx, "--onnx", "expected an ONNX model file, got no such file")
    if (o.out / o.name / o.version).exists() and not o.force:
        raise BundleError(
            o.out / o.name / o.version,
            "--version",
            "expected a new version, got one that exists (--force replaces it)",
        )
    calibrate = o.folders.check()
    try:
        session, providers = create_session(o.onnx, o.threads, "auto")
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        hint = _checkpoint_hint(o.onnx)
        raise BundleError(
            o.onnx, "--onnx", f"expected an ONNX model onnxruntime can load, got {hint or exc}"
        ) from None
    graph = read_graph(session, o.onnx, o.input_name, o.output_name)
    fixed = graph.fixed_size
    if fixed is not None and o.size is not None and o.size != fixed:
        raise BundleError(o.onnx, "--size", f"expected the graph's fixed input size {fixed}, got {o.size}")
    try:
        spec = InputSpec(
            name=graph.input_name,
            mean=o.mean,
            std=o.std,
            pixel_scale=o.pixel_scale,
            size=o.size or fixed,
            multiple_of=o.multiple_of,
        )
    except ValueError as exc:
        raise BundleError(
            "command line", "--mean/--std/--pixel-scale/--size", str(exc).splitlines()[-1].strip()
        ) from None
    runner = Runner(session, graph, spec)
    num_classes, stride = probe(runner, o.onnx)
    classes = class_infos(o.classes, num_classes)
    if calibrate and o.folders.label_format == "cityscapes-ids" and num_classes != len(classes_cityscapes()):
        raise BundleError(
            "command line",
            "--label-format",
            f"expected a model of the {len(classes_cityscapes())} Cityscapes classes for cityscapes-ids, "
            f"got {num_classes} output channels (use train-ids)",
        )
    result = None
    if calibrate:
        f = o.folders
        assert f.source_images and f.target_images
        total = len(list_images(f.source_images, "--source-images")) + len(
            list_images(f.target_images, "--target-images")
        )
        advance = progress(total) if progress is not None else _nothing
        result = fit_calibration(runner, f, num_classes, o.refit, o.taus, o.pixels_per_image, advance)
    choice = result.choice if result is not None else None
    data: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    calibration = None
    if result is not None:
        f = o.folders
        data = {
            "source_images": str(f.source_images),
            "source_labels": str(f.source_labels),
            "target_images": str(f.target_images),
            "target_labels": str(f.target_labels) if f.target_labels is not None else None,
            "label_format": f.label_format,
            "pixels_per_image": o.pixels_per_image,
            **result.counts,
        }
        metrics = {
            "calibration_choice": result.choice,
            "refit": {
                "target_pixels": [int(v) for v in result.report.target_pixels],
                "fallback_rows": [int(c) for c in np.flatnonzero(result.report.fallback_rows)],
                "keep_fraction": result.report.keep_fraction,
            },
        }
        calibration = CalibrationSpec(
            enabled_default=bool(result.choice["enabled"]),
            tau_default=float(result.choice["tau"]),
            eps=result.tables.eps,
            num_knots=int(result.tables.shifts.delta.shape[-1]),
            source_domain=str(f.source_images),
            target_domain=str(f.target_images),
            calibrators=list(result.calibrators) if result.calibrators else None,
            default_calibrator=result.default_calibrator,
            tuning_table=result.tuning_table,
        )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=o.name,
        version=o.version,
        description=o.description or f"{o.onnx.name}, bundled by blda bundle create",
        classes=classes,
        input=spec,
        output=OutputSpec(name=graph.output_name, num_classes=num_classes, stride=stride),
        calibration=calibration,
        provenance=Provenance(
            trained=True,
            network=f"onnx: {o.onnx.name} ({graph.producer})",
            config={
                "created_by": "blda bundle create",
                "onnx": str(o.onnx),
                "graph": graph.to_dict(),
                "refit": asdict(o.refit) if result is not None else None,
                "taus": list(o.taus) if result is not None else None,
            },
            data=data,
            metrics=metrics,
        ),
    )
    fitted = result.calibrators if result is not None and result.calibrators else None
    bundle = save_bundle(o.out, o.onnx, result.tables if result is not None else None, manifest, fitted)
    return {
        "bundle": str(bundle),
        "providers": list(providers),
        "graph": graph.to_dict(),
        "num_classes": num_classes,
        "stride": stride,
        "calibration": None
        if choice is None
        else {k: v for k, v in choice.items() if k in ("enabled", "tau", "reason", "default_calibrator")},
    }


def _nothing() -> None:
    return None


def _checkpoint_hint(path: Path) -> str | None:
    """One line for a torch checkpoint given where an ONNX model is expected (not the parser's paragraph)."""
    if sniff_model_file(path) == "a torch checkpoint":
        return "a torch checkpoint, not ONNX: export it first (`blda export --checkpoint ...`)"
    return None
