"""Helpers of the monitoring tests: a bundle whose logits the tests can compute exactly, and its figures.

The model is AveragePool(4x4) then a 1x1 convolution, with a normalisation and weights that are dyadic
rationals (pixel / 256 - 0.5, weights in multiples of 1/64): every intermediate value is exact in float32,
so onnxruntime's logits equal the numpy ones bit for bit, and the tests know the service's decisions
(raw and calibrated) without trusting it.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from calibration.alignment import calibrated_decision
from calibration.bias import confusion_matrix
from calibration.bundle import SCHEMA_VERSION, Manifest, save_bundle
from calibration.distributions import Gmm
from calibration.segmentation import upsample_bilinear
from calibration.tables import CalibrationTables, anchor_quantile, build_calibration_tables, positive_quantile
from service.records import SegmentationRecord, StageTimings

CLASS_NAMES = ("road", "sidewalk", "building", "traffic light", "vegetation", "sky")
STRIDE = 4
TAU = 0.5
MODEL = "exact"
VERSION = "1"


def model_weights(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = len(CLASS_NAMES)
    weight = rng.integers(-512, 513, (c, 3)) / 64.0  # (C, 3) in [-8, 8], multiples of 1/64
    bias = rng.integers(-64, 65, c) / 64.0  # (C,)
    return weight, bias


def onnx_model(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """image (N, 3, H, W) -> AveragePool 4x4 -> 1x1 conv -> logits (N, C, H/4, W/4)."""
    c = weight.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node(
                "AveragePool", ["image"], ["pooled"], kernel_shape=[STRIDE, STRIDE], strides=[STRIDE, STRIDE]
            ),
            helper.make_node("Conv", ["pooled", "weight", "bias"], ["logits"], kernel_shape=[1, 1]),
        ],
        "exact",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c, "h", "w"])],
        initializer=[
            numpy_helper.from_array(weight.reshape(c, 3, 1, 1).astype(np.float32), "weight"),
            numpy_helper.from_array(bias.astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference_logits(rgb: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with H, W multiples of 4 -> (C, H/4, W/4) float32, as the bundle computes them."""
    h, w = rgb.shape[0] // STRIDE, rgb.shape[1] // STRIDE
    x = rgb.astype(np.float64) / 256.0 - 0.5  # (H, W, 3)
    pooled = x.reshape(h, STRIDE, w, STRIDE, 3).mean(axis=(1, 3))  # (h, w, 3)
    logits = np.einsum("ck,hwk->chw", weight, pooled) + bias[:, None, None]  # (C, h, w)
    return logits.astype(np.float32)


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 smooth colour fields plus noise: masks with several classes and boundaries."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        128 + 110 * np.sin(x / rng.uniform(6, 30) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(6, 30))
        for _ in range(3)
    ]
    return (np.stack(channels, axis=-1) + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)


def fitted_tables(weight: np.ndarray, bias: np.ndarray) -> CalibrationTables:
    """One-component GMMs per pair fitted to the model's logits on a few scenes, with a source domain
    whose positive logits are shifted per class, so that the calibrated decision flips some pixels."""
    c = len(CLASS_NAMES)
    samples = [reference_logits(scene(64, 64, 100 + s), weight, bias).reshape(c, -1) for s in range(4)]
    logits = np.concatenate(samples, axis=1)  # (C, P)
    labels = logits.argmax(axis=0)  # (P,) pseudo-labels
    means = np.zeros((c, c, 1))
    stds = np.ones((c, c, 1))
    counts = np.zeros((c, c), np.int64)
    for true in range(c):
        z = logits[:, labels == true]  # (C, n)
        counts[true] = z.shape[1]
        if z.shape[1] >= 2:
            means[true, :, 0] = z.mean(axis=1)
            stds[true, :, 0] = np.maximum(z.std(axis=1), 0.1)
    weights = np.ones((c, c, 1))
    target = Gmm(weights, means, stds)
    shifted = means.copy()
    shifted[np.arange(c), np.arange(c), 0] += np.linspace(-1.5, 1.5, c)
    source = Gmm(weights, shifted, stds)
    return build_calibration_tables(source, counts, target, counts, num_knots=64)


def manifest() -> Manifest:
    raw = {
        "schema_version": SCHEMA_VERSION,
        "name": MODEL,
        "version": VERSION,
        "description": "monitoring test bundle: exact float32 arithmetic",
        "classes": [
            {"id": i, "name": n, "color": [40 * i, 255 - 40 * i, 7 * i]} for i, n in enumerate(CLASS_NAMES)
        ],
        # (x / 256 - 0.5) / 1: exact in float32.
        "input": {"mean": [0.5] * 3, "std": [1.0] * 3, "pixel_scale": 256.0, "multiple_of": STRIDE},
        "output": {"num_classes": len(CLASS_NAMES), "stride": STRIDE},
        "calibration": {"enabled_default": True, "tau_default": TAU, "num_knots": 64},
        "provenance": {"trained": False, "network": "avgpool4-conv1x1"},
    }
    return Manifest.model_validate(raw)


def write_bundle(models_dir: Path) -> tuple[Path, CalibrationTables]:
    weight, bias = model_weights()
    tables = fitted_tables(weight, bias)
    return save_bundle(models_dir, onnx_model(weight, bias), tables, manifest()), tables


def random_record(
    tables: CalibrationTables | None,
    seed: int,
    logit_shape: tuple[int, int] = (7, 9),
    input_size: tuple[int, int] = (30, 41),
    calibrate: bool = True,
) -> SegmentationRecord:
    """A record of random logits (input size not a multiple of the logits: uneven pixel weights)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (len(CLASS_NAMES), *logit_shape)).astype(np.float32)  # (C, h, w)
    raw = logits.argmax(axis=0)
    cal = None
    if calibrate:
        assert tables is not None
        cal = calibrated_decision(logits, tables.shifts, tau=1.0).astype(np.uint8)
    return SegmentationRecord(
        request_id=f"r{seed}",
        model_name="m",
        model_version="1",
        raw_decision=raw.astype(np.uint8),
        calibrated_decision=cal,
        winning_logits=np.take_along_axis(logits, raw[None], axis=0)[0],
        logits=logits,
        tables=tables,
        input_size=input_size,
        calibrate=calibrate,
        tau=1.0,
        timings=StageTimings(0.001, 0.002, 0.003, 0.004),
    )


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@dataclass
class Expected:
    """What the service must have counted, computed by slow, direct means from the test's own logits."""

    num_classes: int
    pixels: np.ndarray  # (2, C) [raw, calibrated]
    calibration_input: np.ndarray  # (C,)
    flipped: np.ndarray  # (2, C)
    u_sum: np.ndarray  # (2, C)
    a_sum: np.ndarray  # (2, C)
    confusion: np.ndarray  # (2, C, C)

    @classmethod
    def empty(cls, c: int) -> Expected:
        return cls(
            c,
            np.zeros((2, c), np.int64),
            np.zeros(c, np.int64),
            np.zeros((2, c), np.int64),
            np.zeros((2, c)),
            np.zeros((2, c)),
            np.zeros((2, c, c), np.int64),
        )

    def add_request(
        self, logits: np.ndarray, tables: CalibrationTables, calibrate: bool
    ) -> tuple[np.ndarray, ...]:
        """Count one request at input resolution; returns the input-resolution raw (and calibrated) masks.

        The bundle's input is the image's own size, so the service decides at the image's size (at most
        the input x decision_scale) on logits upsampled bilinearly: no nearest resize follows.
        """
        logits = upsample_bilinear(logits, (logits.shape[1] * STRIDE, logits.shape[2] * STRIDE))  # (C, H, W)
        raw = logits.argmax(axis=0)  # (H, W)
        decisions = [raw]
        if calibrate:
            decisions.append(calibrated_decision(logits, tables.shifts, tau=TAU))
        masks = []
        for d, decision in enumerate(decisions):
            z = np.take_along_axis(logits, decision[None], axis=0)[0]  # (H, W)
            up, z_up = decision.ravel(), z.ravel()
            self.pixels[d] += np.bincount(up, minlength=self.num_classes)
            u = positive_quantile(z_up, up, tables)
            a = anchor_quantile(z_up, tables)
            for c in range(self.num_classes):
                self.u_sum[d, c] += u[up == c].sum()
                self.a_sum[d, c] += a[up == c].sum()
            masks.append(decision)
        if calibrate:
            raw_up, cal_up = masks
            changed = raw_up != cal_up
            self.calibration_input += np.bincount(raw_up.ravel(), minlength=self.num_classes)
            self.flipped[0] += np.bincount(raw_up[changed], minlength=self.num_classes)
            self.flipped[1] += np.bincount(cal_up[changed], minlength=self.num_classes)
        return tuple(masks)

    def add_feedback(self, masks: tuple[np.ndarray, ...], truth: np.ndarray) -> None:
        for d, mask in enumerate(masks):
            self.confusion[d] += confusion_matrix(mask, truth, self.num_classes)


def require_tool(name: str, package: str = "prometheus") -> str:
    """Path of a Prometheus tool; skips without it, except on CI (CI=true) where it must be installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian package {package!r}; .ci/run installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll a condition (observers run after the response, on the worker pool), bounded."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
