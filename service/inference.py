"""Bundles as running models: onnxruntime sessions and the worker pools (decisions: service.pipeline).

CPU-bound work (decoding, the calibrated decision, encoding) runs in a thread pool and inference in its
own small pool, never on the event loop: onnxruntime and numpy's kernels release the GIL, so stages of
different requests overlap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from calibration.bundle import MANIFEST_FILE, Bundle, BundleError, load_bundle
from service.batching import MicroBatcher
from service.imaging import Normalisation, model_input_size, palette_bytes
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

T = TypeVar("T")


# Whether CUDA really ran in this process: probed once, since a failed probe is slow and noisy.
_cuda_usable: dict[str, bool] = {}


def create_session(
    model_path: Path, threads: int, provider: str = "auto"
) -> tuple[ort.InferenceSession, tuple[str, ...]]:
    """An onnxruntime session on CUDA when it really runs there, else on the CPU; and its providers.

    onnxruntime-gpu lists the CUDA provider wherever it is installed, GPU or not, and silently falls back
    to the CPU when CUDA cannot start: only the providers of the created session tell the truth.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads would burn the cores that decode and encode other requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == "auto" and CUDA in ort.get_available_providers() and _cuda_usable.get("cuda", True):
        first_probe = "cuda" not in _cuda_usable
        if first_probe:
            ort.set_default_logger_severity(4)  # a failed probe logs errors that are expected on CPU machines
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=[CUDA, CPU])
        finally:
            if first_probe:
                ort.set_default_logger_severity(2)
        _cuda_usable["cuda"] = CUDA in session.get_providers()
        if _cuda_usable["cuda"]:
            return session, tuple(session.get_providers())
        log.info("the CUDA provider is installed but cannot run here: sessions run on the CPU")
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=[CPU])
    return session, tuple(session.get_providers())


# eq=False: identity semantics, hashable and weakly referenceable (the runner keys batchers by model).
@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded bundle version, ready to run. Immutable: a reload builds a new one."""

    bundle: Bundle
    session: ort.InferenceSession
    providers: tuple[str, ...]
    norm: Normalisation
    palette: bytes  # 768-byte PNG palette of the classes
    loaded_at: float  # unix time

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def num_classes(self) -> int:
        return self.bundle.manifest.output.num_classes

    @property
    def has_calibration(self) -> bool:
        return self.bundle.tables is not None

    @property
    def calibrate_default(self) -> bool:
        return self.bundle.default_calibrator != "none"

    @property
    def calibrator_names(self) -> list[str]:
        """What requests may ask for (calibrator=): the bundle's calibrators, "none" first."""
        return list(self.bundle.calibrators)

    @property
    def default_calibrator(self) -> str:
        return self.bundle.default_calibrator

    @property
    def tau_default(self) -> float:
        spec = self.bundle.manifest.calibration
        return spec.tau_default if spec is not None else 0.2

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        spec = self.bundle.manifest.input
        return model_input_size(height, width, spec.size, spec.multiple_of)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, C, h, w) float32 logits."""
        manifest = self.bundle.manifest
        (logits,) = self.session.run([manifest.output.name], {manifest.input.name: batch})
        return np.asarray(logits)


def load_served_model(directory: Path, threads: int, provider: str = "auto") -> ServedModel:
    """Load, validate and warm up ``<models_dir>/<name>/<version>``; every failure is a BundleError."""
    bundle = load_bundle(directory)
    manifest = bundle.manifest
    manifest_path = directory / MANIFEST_FILE
    if (manifest.name, manifest.version) != (directory.parent.name, directory.name):
        raise BundleError(
            manifest_path,
            "name" if manifest.name != directory.parent.name else "version",
            f"expected {directory.parent.name}/{directory.name} (the bundle's directory), "
            f"got {manifest.name}/{manifest.version}",
        )
    try:
        session, providers = create_session(bundle.model_path, threads, provider)
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        raise BundleError(
            bundle.model_path, "", f"expected an ONNX model onnxruntime can load, got: {exc}"
        ) from exc
    # The graph's names are the manifest's (any exported model names them its own way).
    input_name, output_name = manifest.input.name, manifest.output.name
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if input_name not in inputs or len(inputs[input_name].shape) != 4:
        found = {name: i.shape for name, i in inputs.items()}
        raise BundleError(
            manifest_path,
            "input.name",
            f"expected an input {input_name!r} (N, 3, H, W) in {bundle.model_path.name}, got {found}",
        )
    if output_name not in outputs:
        raise BundleError(
            manifest_path,
            "output.name",
            f"expected an output {output_name!r} in {bundle.model_path.name}, got {sorted(outputs)}",
        )
    spec = manifest.input
    model = ServedModel(
        bundle=bundle,
        session=session,
        providers=providers,
        norm=Normalisation.from_spec(spec.mean, spec.std, spec.pixel_scale),
        palette=palette_bytes(manifest.palette()),
        loaded_at=time.time(),
    )
    _check_by_running(model)
    return model


def _check_by_running(model: ServedModel) -> None:
    """Run one small input: a model that loads but cannot run, or disagrees with its manifest, fails here."""
    spec = model.bundle.manifest.input
    height, width = spec.size if spec.size is not None else (2 * spec.multiple_of, 2 * spec.multiple_of)
    try:
        logits = model.run(np.zeros((1, 3, height, width), dtype=np.float32))
    except Exception as exc:
        raise BundleError(
            model.bundle.model_path,
            "",
            f"expected a model that runs on (1, 3, {height}, {width}), got: {exc}",
        ) from exc
    stride = model.bundle.manifest.output.stride
    expected = (1, model.num_classes, -(-height // stride), -(-width // stride))
    if logits.ndim != 4 or logits.shape[:2] != expected[:2]:
        # The manifest and the graph disagree: name the manifest field an operator would fix.
        raise BundleError(
            model.bundle.directory / MANIFEST_FILE,
            "output.num_classes",
            f"expected logits (1, {model.num_classes}, h, w) (output.num_classes in the manifest) from "
            f"{model.bundle.model_path.name}'s output {model.bundle.manifest.output.name!r}, "
            f"got {tuple(logits.shape)}",
        )
    sides_ok = all(
        size // stride <= side <= -(-size // stride)
        for size, side in zip((height, width), logits.shape[2:], strict=True)
    )
    if not sides_ok:
        # The service resizes decisions to the image whatever the stride, but the manifest must describe
        # the graph: tools that map logit pixels to image pixels read it.
        raise BundleError(
            model.bundle.directory / MANIFEST_FILE,
            "output.stride",
            f"expected logits of {expected[2]}x{expected[3]} for a {height}x{width} input "
            f"(output.stride = {stride} in the manifest), got {logits.shape[2]}x{logits.shape[3]}",
        )


def raw_decision(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) -> argmax (h, w) uint8 and the winning logit (h, w) float32."""
    winner = logits.argmax(axis=0)  # (h, w) int64
    winning = np.take_along_axis(logits, winner[None], axis=0)[0]
    return winner.astype(np.uint8), winning


class InferenceRunner:
    """The thread pools and batchers of one app; one per process."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.cpu_pool = ThreadPoolExecutor(settings.thread_pool_size(), thread_name_prefix="blda-cpu")
        # Inference holds a slot while it runs: with few cores, fewer concurrent runs each get more threads.
        self._inference_slots = threading.BoundedSemaphore(settings.max_concurrent_inferences)
        # Micro-batches run here (one at a time per slot), not on the CPU pool.
        self.infer_pool = ThreadPoolExecutor(
            settings.max_concurrent_inferences, thread_name_prefix="blda-infer"
        )
        # Requests in progress (body received) and bodies being received; only the event loop changes
        # them (see service.admission).
        self.pending = 0
        self.uploading = 0
        # Weak keys: a model replaced by a reload takes its batcher with it.
        self._batchers: weakref.WeakKeyDictionary[ServedModel, MicroBatcher] = weakref.WeakKeyDictionary()

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, partial(fn, *args))

    @property
    def batching(self) -> bool:
        return self.settings.batch_max_size > 1

    def run_inference(self, model: ServedModel, image: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, C, h, w) in the calling thread, within the concurrency limit."""
        with self._inference_slots:
            return model.run(image)

    async def infer(self, model: ServedModel, image: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) -> (1, C, h, w), batched with concurrent requests when enabled."""
        if self.settings.batch_max_size <= 1:
            return await asyncio.get_running_loop().run_in_executor(
                self.infer_pool, self.run_inference, model, image
            )
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = MicroBatcher(
                self.infer_pool, self.settings.batch_max_size, self.settings.batch_max_wait_ms / 1000
            )
            self._batchers[model] = batcher
        return await batcher.submit(model.run, image)

    def shutdown(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
