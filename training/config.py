"""Typed training configuration: frozen dataclasses, arm presets, a TOML/JSON file and `--set` overrides.

A run's configuration is `preset(arm)`, then the file's values, then `--set section.key=value` overrides, in
that order. Every value is type-checked against its dataclass field and errors name the key (and the file).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; str() names the key (and the file, when there is one)."""


# The dataset formats a domain can be read in (training.data.datasets.FORMATS opens them; a test keeps the
# two lists equal, so this module stays free of the readers' imports).
DATA_FORMATS = ("gta5", "synthia", "cityscapes", "folder")


@dataclass(frozen=True)
class DataConfig:
    # Each domain is a folder under --data (or an absolute path) in one of DATA_FORMATS. Formats without
    # splits (gta5, synthia) keep the source's held-out val split in a sibling folder named <folder>_val.
    source: str = "source"  # the labelled source domain
    target: str = "target"  # the target domain (train, with the tuning split carved out of it, and val)
    source_format: str = "gta5"
    target_format: str = "cityscapes"
    # The folder format without splits/{train,val}.txt: every round(1 / val_fraction)-th pair is val.
    val_fraction: float = 0.2
    crop_height: int = 128
    crop_width: int = 256
    # Images are rescaled by a random factor in [scale_min, scale_max] before cropping (the synthetic
    # benchmark's 256x512 images at 0.5 are exactly one 128x256 crop); evaluation uses eval_scale.
    scale_min: float = 0.5
    scale_max: float = 0.5
    eval_scale: float = 0.5
    batch_source: int = 2
    batch_target: int = 2
    rare_class_sampling: bool = True
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 1000  # an image serves a class it has at least this many pixels of (full size)
    # Strength of the brightness/contrast/saturation jitter on mixed images (0.4, chosen on the tuning split:
    # the synthetic target is darker and less saturated than the source).
    color_jitter: float = 0.4
    blur: bool = True
    # A held-out part of target train for any tuning; the evaluation split is never used for choices.
    tuning_fraction: float = 0.1
    val_limit: int = 0  # evaluate on at most this many target val images (0: all)
    # "val": the evaluation split (reported numbers); "tuning": the held-out part of target train (choices).
    eval_split: str = "val"


@dataclass(frozen=True)
class ModelConfig:
    network: str = "mobilenet_lraspp"
    num_classes: int = 19
    # A training checkpoint whose weights start the student and the EMA teacher (fresh optimiser, iteration
    # 0): the adaptation arms start from one shared, converged source-only model, our stand-in for the
    # paper's ImageNet-pretrained start. Empty: random initialisation.
    init_checkpoint: str = ""


@dataclass(frozen=True)
class OptimConfig:
    iterations: int = 500  # ~5 min for a self-training arm on a shared 2-core machine
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    poly_power: float = 1.0
    grad_clip: float = 10.0
    # "full": upsample logits to the label resolution before the losses (DAFormer); "logits": losses at
    # the logits' resolution with nearest-downsampled labels (cheaper).
    loss_resolution: str = "full"
    # Mixed precision: the forward passes under autocast (bfloat16; float16 with loss scaling on GPUs
    # without bfloat16), the GMMs, tables and losses in float32/float64. Off: bit-exact CPU reference runs.
    amp: bool = False


@dataclass(frozen=True)
class SelfTrainingConfig:
    enabled: bool = False
    # DACS uses 0.99 and 0.968 for 40k iterations from ImageNet weights; from scratch in 500 iterations the
    # averaged teacher lags far behind and is never confident, so both were lowered on the tuning split.
    ema_alpha: float = 0.9
    pseudo_threshold: float = 0.9
    # Target loss starts after this many source-only iterations (a random-init model gives useless
    # pseudo-labels); ramps linearly to full weight over `ramp_iters`.
    start_iter: int = 150
    ramp_iters: int = 50
    classmix: bool = True
    # BatchNorm statistics: the teacher labels a target batch with that batch's statistics ("batch") or
    # with the running ones ("running", DACS); at the end the student's running statistics are re-estimated
    # on this many unlabelled target-train images (AdaBN; 0: off). Running statistics gathered on source
    # and mixed batches misfit the target (on the tuning split: 8 vs 22 mIoU for the same weights).
    teacher_bn: str = "batch"
    adabn_images: int = 200
    # Pseudo-label weight 0 on this bottom fraction of each target crop's rows, as DAFormer does for the
    # rows where Cityscapes shows the ego vehicle (the synthetic target draws a bonnet over ~8-14%).
    pseudo_ignore_bottom: float = 0.0


@dataclass(frozen=True)
class BldaConfig:
    enabled: bool = False
    correct_source: bool = True
    correct_target: bool = True
    # Teacher logits corrected with the target GMMs before the pseudo-label argmax: off by default, chosen on
    # the tuning split (one seed, 500 iterations: 28.2 mIoU off vs 27.3 on; self-training 27.8).
    correct_pseudo_labels: bool = False
    # Corrected CE: CE(z - t * Δ(z), y). The paper's t = 0.1, also the better of {0.1, 0.3} on the tuning
    # split in the warm-started protocol (README, 47.09 vs 46.06 mIoU; self-training 47.06).
    t: float = 0.1
    pseudo_tau: float = 0.2  # teacher logits z + τΔ before the pseudo-label argmax
    pseudo_top_k: int = 2  # hypotheses tried per pixel for the corrected pseudo-labels (0: all C)
    cdf_weight: float = 0.0  # λ of the CDF-head L1 loss (paper 0.2, released config 0)
    cdf_target: bool = True  # the CDF loss also on the mixed images (L_reg^S + L_reg^T, as in the paper)
    # "labels": Δ and the GMM samples from the logits upsampled bilinearly to the label size (the reference
    # implementation; on the tuning split, 3 seeds: 42.04 vs 41.87 mIoU at t = 0.1 in the first warm-start
    # experiment); "logits": at the logits' resolution with nearest-downsampled labels (cheaper, but thin
    # classes lose most of their correction).
    delta_resolution: str = "labels"
    # A GMM row (true class c) is updated only from a batch with at least this many pixels of c, counted
    # at the resolution of the samples (the reference: 500 at label resolution).
    min_pixels: int = 500
    # Target GMMs from pseudo-labelled pixels whose teacher confidence exceeds this (0: every pixel with a
    # pseudo-label, as the reference): confident pixels confirm the teacher's errors less.
    target_gmm_confidence: float = 0.0
    # Anchors pool the source pairs weighted by "pixels" (the paper: dominated by road and building) or
    # with each class weighted equally ("classes").
    anchor_weighting: str = "pixels"
    t_ramp_iters: int = 0  # t grows linearly from 0 over this many iterations after start_iter (0: a step)
    components: int = 5
    em_steps: int = 3
    samples_per_class: int = 128
    momentum: float = 0.99
    momentum_ramp_iters: int = 100  # official 1500 over 40k iterations; scaled to short runs
    catchup_after: int = 20  # a pair missed this many iterations gets at most `catchup_momentum`
    catchup_momentum: float = 0.9
    start_iter: int = 100  # correction is applied from this iteration (GMMs are estimated from 0)
    table_every: int = 10  # rebuild the anchors and the per-pair shift tables every this many iterations
    table_knots: int = 256
    eps: float = 0.01
    track_target: bool = True  # estimate target GMMs (needed for target correction and export)


@dataclass(frozen=True)
class LogConfig:
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 0  # 0: only at the end
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    arm: str = "source-only"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    blda: BldaConfig = field(default_factory=BldaConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _source_only() -> TrainConfig:
    return TrainConfig(arm="source-only")


def _self_training() -> TrainConfig:
    return TrainConfig(arm="self-training", self_training=SelfTrainingConfig(enabled=True))


def _blda() -> TrainConfig:
    return TrainConfig(
        arm="blda", self_training=SelfTrainingConfig(enabled=True), blda=BldaConfig(enabled=True)
    )


ARMS: dict[str, Callable[[], TrainConfig]] = {
    "source-only": _source_only,
    "self-training": _self_training,
    "blda": _blda,
}

LOSS_RESOLUTIONS = ("full", "logits")
DELTA_RESOLUTIONS = ("labels", "logits")
ANCHOR_WEIGHTINGS = ("pixels", "classes")


def preset(arm: str) -> TrainConfig:
    if arm not in ARMS:
        raise ConfigError(f"arm: expected one of {sorted(ARMS)}, got {arm!r}")
    return ARMS[arm]()


def _coerce(key: str, value: Any, kind: Any, where: str) -> Any:
    """Check/convert one leaf value to the field's type (str values come from --set)."""
    prefix = f"{where}{key}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{prefix}: expected a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{prefix}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{prefix}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{prefix}: expected a string, got {value!r}")
    raise ConfigError(f"{prefix}: unsupported field type {kind!r}")


def _apply(obj: Any, values: Mapping[str, Any], path: str, where: str) -> Any:
    """Return `obj` (a dataclass) with `values` (nested mapping) applied, type-checked."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    changes: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{path}{name}"
        if name not in names:
            raise ConfigError(f"{where}{key}: unknown key; expected one of {names}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{key}: expected a table of settings, got {value!r}")
            changes[name] = _apply(current, value, f"{key}.", where)
        else:
            changes[name] = _coerce(key, value, hints[name], where)
    return replace(obj, **changes)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["optim.lr=0.01", "blda.t=0.2"] -> {"optim": {"lr": "0.01"}, "blda": {"t": "0.2"}}."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value.strip()
    return nested


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: expected a TOML or JSON config file, got no such file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"{path}: expected valid {kind}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    return data


def _data_checks(data: DataConfig) -> list[tuple[bool, str]]:
    return [
        (
            data.source_format in DATA_FORMATS,
            f"data.source_format: expected one of {list(DATA_FORMATS)}, got {data.source_format!r}",
        ),
        (
            data.target_format in DATA_FORMATS,
            f"data.target_format: expected one of {list(DATA_FORMATS)}, got {data.target_format!r}",
        ),
        (bool(data.source), "data.source: expected a folder name, got ''"),
        (bool(data.target), "data.target: expected a folder name, got ''"),
        (0 <= data.val_fraction < 1, f"data.val_fraction: expected in [0, 1), got {data.val_fraction}"),
    ]


def data_config(base: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> DataConfig:
    """A DataConfig from a stored one (a checkpoint's or a bundle's `config["data"]`; defaults when None)
    with `key=value` or `data.key=value` overrides applied, type-checked and validated: what `blda
    evaluate`, `export` and `diagnose` read the data with."""
    cfg = _apply(DataConfig(), base or {}, "data.", "config: ")
    items = [item if item.startswith("data.") else f"data.{item}" for item in overrides]
    nested = parse_overrides(items).get("data", {})
    cfg = _apply(cfg, nested, "data.", "--set ")
    for ok, message in _data_checks(cfg):
        if not ok:
            raise ConfigError(message)
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    checks: list[tuple[bool, str]] = [
        (cfg.arm in ARMS, f"arm: expected one of {sorted(ARMS)}, got {cfg.arm!r}"),
        *_data_checks(cfg.data),
        (cfg.data.crop_height > 0 and cfg.data.crop_width > 0, "data.crop_*: expected positive sizes"),
        (
            0 < cfg.data.scale_min <= cfg.data.scale_max,
            "data.scale_min/scale_max: expected 0 < min <= max, "
            f"got {cfg.data.scale_min}, {cfg.data.scale_max}",
        ),
        (cfg.data.eval_scale > 0, f"data.eval_scale: expected > 0, got {cfg.data.eval_scale}"),
        (cfg.data.batch_source > 0, f"data.batch_source: expected > 0, got {cfg.data.batch_source}"),
        (cfg.data.batch_target > 0, f"data.batch_target: expected > 0, got {cfg.data.batch_target}"),
        (0 <= cfg.data.tuning_fraction < 1, "data.tuning_fraction: expected in [0, 1)"),
        (
            cfg.data.eval_split in ("val", "tuning"),
            f"data.eval_split: expected 'val' or 'tuning', got {cfg.data.eval_split!r}",
        ),
        (cfg.optim.iterations > 0, f"optim.iterations: expected > 0, got {cfg.optim.iterations}"),
        (cfg.optim.lr > 0, f"optim.lr: expected > 0, got {cfg.optim.lr}"),
        (
            cfg.optim.loss_resolution in LOSS_RESOLUTIONS,
            f"optim.loss_resolution: expected one of {list(LOSS_RESOLUTIONS)}, "
            f"got {cfg.optim.loss_resolution!r}",
        ),
        (
            cfg.self_training.teacher_bn in ("batch", "running"),
            f"self_training.teacher_bn: expected 'batch' or 'running', got {cfg.self_training.teacher_bn!r}",
        ),
        (0 <= cfg.self_training.ema_alpha < 1, "self_training.ema_alpha: expected in [0, 1)"),
        (0 <= cfg.self_training.pseudo_threshold < 1, "self_training.pseudo_threshold: expected in [0, 1)"),
        (cfg.blda.components > 0, f"blda.components: expected > 0, got {cfg.blda.components}"),
        (cfg.blda.em_steps > 0, f"blda.em_steps: expected > 0, got {cfg.blda.em_steps}"),
        (0 <= cfg.blda.momentum < 1, f"blda.momentum: expected in [0, 1), got {cfg.blda.momentum}"),
        (0 < cfg.blda.eps < 0.5, f"blda.eps: expected in (0, 0.5), got {cfg.blda.eps}"),
        (cfg.blda.table_every > 0, "blda.table_every: expected > 0"),
        (
            cfg.blda.delta_resolution in DELTA_RESOLUTIONS,
            f"blda.delta_resolution: expected one of {list(DELTA_RESOLUTIONS)}, got {cfg.blda.delta_resolution!r}",
        ),
        (
            cfg.blda.delta_resolution != "labels" or cfg.optim.loss_resolution == "full",
            "blda.delta_resolution: expected 'logits' with optim.loss_resolution = 'logits' (labels-resolution Δ "
            "needs the logits upsampled to the labels)",
        ),
        (
            cfg.blda.anchor_weighting in ANCHOR_WEIGHTINGS,
            f"blda.anchor_weighting: expected one of {list(ANCHOR_WEIGHTINGS)}, got {cfg.blda.anchor_weighting!r}",
        ),
        (cfg.blda.min_pixels >= 1, f"blda.min_pixels: expected >= 1, got {cfg.blda.min_pixels}"),
        (0 <= cfg.blda.target_gmm_confidence < 1, "blda.target_gmm_confidence: expected in [0, 1)"),
        (cfg.blda.t_ramp_iters >= 0, "blda.t_ramp_iters: expected >= 0"),
        (
            0 <= cfg.self_training.pseudo_ignore_bottom < 1,
            "self_training.pseudo_ignore_bottom: expected a fraction in [0, 1)",
        ),
        (cfg.blda.table_knots >= 16, "blda.table_knots: expected >= 16"),
        (cfg.blda.samples_per_class > 0, "blda.samples_per_class: expected > 0"),
        (cfg.blda.cdf_weight >= 0, "blda.cdf_weight: expected >= 0"),
        (
            not cfg.blda.enabled or cfg.self_training.enabled,
            "blda.enabled: expected self_training.enabled = true (BLDA corrects the self-training losses)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def load_config(
    arm: str, path: str | Path | None = None, overrides: Iterable[str] = (), seed: int | None = None
) -> TrainConfig:
    cfg = preset(arm)
    if path is not None:
        cfg = _apply(cfg, read_config_file(path), "", f"{path}: ")
    cfg = _apply(cfg, parse_overrides(overrides), "", "--set ")
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    return validate(cfg)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Inverse of to_dict (checkpoints, manifests)."""
    return validate(_apply(TrainConfig(), data, "", "config: "))
