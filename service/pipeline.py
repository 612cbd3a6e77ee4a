"""One segmentation, bytes to bytes: decode, infer, decide, encode. No fastapi here.

The segment route runs these stages (on its thread pools, maybe batching inference) and `blda predict`
runs them in-process through :func:`segment_bytes`: the same functions, so a predicted mask is the served
mask byte for byte. The decision itself is the core's (:func:`calibration.segmentation.decide`), shared
with `blda evaluate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.calibrators.calibrator import decide_calibrator
from calibration.segmentation import DEFAULT_DECISION_SCALE, decision_size
from service.imaging import (
    class_counts,
    encode_png_mask,
    load_resized,
    normalise,
    open_image,
    resize_weights,
    run_length_encode,
)
from service.inference import ServedModel
from service.settings import ServiceSettings

FORMATS = ("png", "json")
MASK_SIZES = ("image", "decision")


@dataclass(frozen=True)
class SegmentOptions:
    """One request's parameters, fixed before any work starts."""

    calibrate: bool
    tau: float
    output: str = "png"  # "png" | "json"
    max_pixels: int = 4096 * 4096
    decision_scale: float = DEFAULT_DECISION_SCALE
    band_pixels: int = 65536
    png_level: int = 1
    scaled_decode: bool = True  # JPEG: decode at the model's scale when it is at most half the image
    mask_at: str = "image"  # "image": the mask at the image's size; "decision": at the decision size
    raw_mask: bool = False  # json: the raw decision's mask too, beside the served one
    json_head: dict[str, Any] = field(default_factory=dict)  # leading fields of the JSON body
    # The bundle's calibrator that makes the served decision when `calibrate` (see choose_calibrator).
    calibrator: str = "blda"


@dataclass(frozen=True)
class Decision:
    """The decisions at the decision size (H', W'), see calibration.segmentation."""

    raw: np.ndarray  # (H', W') uint8
    calibrated: np.ndarray | None  # (H', W') uint8
    winning_logits: np.ndarray  # (H', W') float32, the raw class's logit
    calibrated_logits: np.ndarray | None  # (H', W') float32, the calibrated class's logit

    @property
    def served(self) -> np.ndarray:
        return self.calibrated if self.calibrated is not None else self.raw


class CalibratorError(ValueError):
    """A request's calibrator that the model cannot serve (the route answers 422)."""


def choose_calibrator(model: ServedModel, calibrate: bool | None, calibrator: str | None) -> str:
    """The calibrator of one request (the route and `blda predict`): `calibrator` when given (one of the
    bundle's), else the manifest's default; calibrate=false is "none", calibrate=true without a calibrator
    the default, or "blda" where the default is "none" (what calibrate=true meant before calibrators)."""
    names = model.calibrator_names
    if calibrator is not None and calibrator not in names:
        raise CalibratorError(
            f"calibrator: expected one of {names} ({model.name}/{model.version}), got {calibrator!r}"
        )
    if calibrate is False:
        if calibrator not in (None, "none"):
            raise CalibratorError(f"calibrate=false contradicts calibrator={calibrator}: drop one of them")
        return "none"
    if calibrator is not None:
        if calibrate and calibrator == "none":
            raise CalibratorError("calibrate=true contradicts calibrator=none: drop one of them")
        return calibrator
    if calibrate and model.default_calibrator == "none":
        if "blda" not in names:
            raise CalibratorError(f"{model.name}/{model.version} has no calibration tables")
        return "blda"
    return model.default_calibrator


@dataclass(frozen=True)
class CalibrationChoice:
    """What one request serves: the calibrator and, for those on the tables, the tau."""

    calibrator: str
    tau: float
    uses_tau: bool

    @property
    def calibrate(self) -> bool:
        return self.calibrator != "none"

    def head(self) -> dict[str, Any]:
        """The JSON body's fields about it (the route's and `blda predict`'s)."""
        return {
            "calibrated": self.calibrate,
            "calibrator": self.calibrator,
            "tau": self.tau if self.calibrate and self.uses_tau else None,
        }


def resolve_calibration(
    model: ServedModel, calibrate: bool | None, calibrator: str | None, tau: float | None
) -> CalibrationChoice:
    """choose_calibrator, and the tau: the request's, else the calibrator's fitted one, else the manifest's."""
    chosen = choose_calibrator(model, calibrate, calibrator)
    fitted = model.bundle.calibrators[chosen]
    default = fitted.tau if fitted.tau is not None else model.tau_default
    return CalibrationChoice(chosen, default if tau is None else tau, fitted.uses_tables)


def options_from(
    settings: ServiceSettings,
    calibrate: bool,
    tau: float,
    output: str = "png",
    raw_mask: bool = False,
    json_head: dict[str, Any] | None = None,
    calibrator: str | None = None,
) -> SegmentOptions:
    """The options of one segmentation under the service's settings (the route and `blda predict`)."""
    if output not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {output!r}")
    return SegmentOptions(
        calibrate=calibrate,
        tau=tau,
        output=output,
        max_pixels=settings.max_image_pixels,
        decision_scale=settings.decision_scale,
        band_pixels=settings.calibration_chunk_pixels,
        png_level=settings.png_compress_level,
        scaled_decode=settings.scaled_decode,
        raw_mask=raw_mask,
        json_head=dict(json_head or {}),
        calibrator=calibrator if calibrator is not None else ("blda" if calibrate else "none"),
    )


def decode(
    model: ServedModel, data: bytes, max_pixels: int, scaled: bool = True
) -> tuple[tuple[int, int], np.ndarray]:
    """bytes -> (H, W) of the image and the (1, 3, h, w) model input.

    With ``scaled``, a decoder that can (JPEG) decodes at the smallest scale >= the model input when that
    input is at most half the image: 1/8 of the pixels for a 1024 x 2048 JPEG into a 128 x 256 input, the
    accuracy unchanged (`python -m bench decode_scaling`)."""
    opened = open_image(data, max_pixels)
    size = model.input_size(*opened.size)
    return opened.size, normalise(load_resized(opened, size, scaled), model.norm)


def decide_for(
    model: ServedModel, logits: np.ndarray, size: tuple[int, int], opts: SegmentOptions
) -> Decision:
    """(C, h, w) logits of an (H, W) image -> decisions at min(image, model input x decision_scale)."""
    out = decision_size(size, model.input_size(*size), opts.decision_scale)
    tables = model.bundle.tables
    name = opts.calibrator if opts.calibrate else "none"
    if name not in model.bundle.calibrators:
        raise CalibratorError(f"calibrator: expected one of {model.calibrator_names}, got {name!r}")
    # A request's tau is the strength of the calibrators on the tables (blda, blda+em-prior).
    calibrator = model.bundle.calibrators[name].with_tau(opts.tau)
    if calibrator.uses_tables and tables is None:
        raise CalibratorError(f"{model.name}/{model.version} has no calibration tables")
    shifts = tables.shifts if tables is not None else None
    made = decide_calibrator(logits, out, calibrator, shifts, opts.band_pixels)
    if not opts.calibrate:
        return Decision(made.raw, None, made.raw_logit, None)
    return Decision(made.raw, made.calibrated[0], made.raw_logit, made.calibrated_logit[0])


def _rle(mask: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    values, lengths = run_length_encode(mask, size)
    return {
        "encoding": "rle-row-major",
        "size": [int(size[0]), int(size[1])],
        "values": values.tolist(),
        "lengths": lengths.tolist(),
    }


def encode(model: ServedModel, decision: Decision, size: tuple[int, int], opts: SegmentOptions) -> bytes:
    """Decisions -> the response body at the image's size (H', W') -> (H, W) nearest.

    The (H, W) masks are never made: the PNG rows, the runs and the pixel counts are computed from the
    decisions at (H', W') (service.imaging), 16 times fewer pixels for a 1024 x 2048 image. With
    ``mask_at="decision"`` the masks stay at (H', W') (the client resizes them; class counts and changed
    pixels are still of the image's pixels)."""
    served = decision.served
    if opts.mask_at not in MASK_SIZES:
        raise ValueError(f"mask_at: expected one of {list(MASK_SIZES)}, got {opts.mask_at!r}")
    mask_size = size if opts.mask_at == "image" else (int(served.shape[0]), int(served.shape[1]))
    if opts.output == "png":
        return encode_png_mask(served, model.palette, opts.png_level, mask_size)
    classes = model.bundle.manifest.class_names
    weights = resize_weights(served.shape, size)  # (H', W') image pixels per decision pixel

    def counts(mask: np.ndarray) -> dict[str, int]:
        per_class = class_counts(mask, len(classes), weights)
        return {name: int(n) for name, n in zip(classes, per_class, strict=True)}

    body: dict[str, Any] = {**opts.json_head, "classes": classes, "class_counts": counts(served)}
    body["decision_size"] = [int(served.shape[0]), int(served.shape[1])]
    if decision.calibrated is not None:
        body["raw_class_counts"] = counts(decision.raw)
        # At the image's size, as the masks the client gets: what the demo page shows as changed.
        body["changed_pixels"] = int(weights[decision.raw != served].sum())
    else:
        body["raw_class_counts"] = body["class_counts"]
        body["changed_pixels"] = None
    body["mask"] = _rle(served, mask_size)
    if opts.raw_mask:
        body["raw_mask"] = _rle(decision.raw, mask_size)
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Segmented:
    size: tuple[int, int]  # (H, W) of the image
    logits: np.ndarray  # (C, h, w) the model's logits
    decision: Decision
    body: bytes


def segment_bytes(
    model: ServedModel,
    data: bytes,
    opts: SegmentOptions,
    run: Callable[[ServedModel, np.ndarray], np.ndarray] | None = None,
) -> Segmented:
    """Every stage in the calling thread; ``run(model, (1, 3, h, w)) -> (1, C, h', w')`` defaults to the
    model's own session (the service passes its concurrency-limited runner)."""
    size, image = decode(model, data, opts.max_pixels, opts.scaled_decode)
    logits = (run(model, image) if run is not None else model.run(image))[0]  # (C, h, w)
    decision = decide_for(model, logits, size, opts)
    return Segmented(size, logits, decision, encode(model, decision, size, opts))
