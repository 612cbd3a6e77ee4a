"""Helpers of the service tests: tiny real bundles (an ONNX graph made with onnx.helper, calibration
tables from random GMMs) written with the core's save_bundle, test images and settings."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from calibration.bundle import SCHEMA_VERSION, Manifest
from calibration.distributions import Gmm
from calibration.tables import CalibrationTables, build_calibration_tables
from service.settings import ServiceSettings

NUM_CLASSES = 19
STRIDE = 4
ADMIN_KEY = "test-admin-key"


# make_bundle(models_dir, name, version, seed, calibrated, size, enabled_default) -> bundle directory
BundleFactory = Callable[..., Path]


def tiny_model(seed: int, num_classes: int = NUM_CLASSES, input_name: str = "image") -> bytes:
    """image (N, 3, H, W) -> AveragePool 4x4 -> 1x1 conv -> logits (N, C, H/4, W/4); N, H, W dynamic."""
    rng = np.random.default_rng(seed)
    # Weights scaled so that many pixels have small top-1/top-2 margins: calibration then flips some.
    weight = rng.normal(0.0, 1.5, (num_classes, 3, 1, 1)).astype(np.float32)
    bias = rng.normal(0.0, 0.5, num_classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "AveragePool",
                [input_name],
                ["pooled"],
                kernel_shape=[STRIDE, STRIDE],
                strides=[STRIDE, STRIDE],
            ),
            helper.make_node("Conv", ["pooled", "weight", "bias"], ["logits"], kernel_shape=[1, 1]),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes, "h", "w"])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def random_tables(seed: int, num_classes: int = NUM_CLASSES, k: int = 3) -> CalibrationTables:
    rng = np.random.default_rng(seed)
    means = rng.normal(-1.0, 0.8, (num_classes, num_classes, k))
    means[np.arange(num_classes), np.arange(num_classes)] += rng.uniform(1.0, 4.0, (num_classes, 1))
    weights = rng.dirichlet(np.ones(k), (num_classes, num_classes))
    stds = rng.uniform(0.4, 1.5, (num_classes, num_classes, k))
    counts = rng.integers(100, 10_000, (num_classes, num_classes))
    return build_calibration_tables(Gmm(weights, means, stds), counts, num_knots=64)


def manifest(
    name: str,
    version: str,
    num_classes: int = NUM_CLASSES,
    calibrated: bool = True,
    size: tuple[int, int] | None = None,
    enabled_default: bool = True,
) -> Manifest:
    rng = np.random.default_rng(1)
    colors = rng.integers(0, 256, (num_classes, 3))
    raw = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "description": "test bundle",
        "classes": [{"id": i, "name": f"class{i}", "color": colors[i].tolist()} for i in range(num_classes)],
        "input": {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "size": size,
            "multiple_of": 8,
        },
        "output": {"num_classes": num_classes, "stride": STRIDE},
        "calibration": {"enabled_default": enabled_default, "tau_default": 0.2, "num_knots": 64}
        if calibrated
        else None,
        "provenance": {"trained": False, "network": "tiny-avgpool-conv1x1"},
    }
    return Manifest.model_validate(raw)


def settings_for(models_dir: Path, **overrides: object) -> ServiceSettings:
    values: dict[str, object] = {
        "models_dir": models_dir,
        "default_model": "tiny",
        "admin_api_key": ADMIN_KEY,
        "intra_op_threads": 1,
        "cpu_threads": 2,
    }
    values.update(overrides)
    return ServiceSettings(**values)  # type: ignore[arg-type]


def png_bytes(image: np.ndarray, mode: str | None = None, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour gradients plus noise, so masks are neither constant nor pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        128 + 100 * np.sin(x / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 40))
        for _ in range(3)
    ]
    image = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height, then IEND: no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
