"""`blda predict`: segment files and folders in-process, through the service's own pipeline.

The model is chosen as the service chooses it (service.registry: the default model, its active version),
and each image goes through :func:`service.pipeline.segment_bytes`, the functions the segment route runs:
a predicted PNG mask is the served one byte for byte. Images run in a thread pool (onnxruntime and numpy
release the GIL); a file that cannot be read or decoded is reported by name and skipped, and the run
exits non-zero at the end. Existing outputs are never replaced without ``overwrite``.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from service.imaging import ImageDecodeError, ImageTooLargeError, decode_image, resize_nearest
from service.inference import ServedModel, load_served_model
from service.pipeline import SegmentOptions, segment_bytes
from service.registry import ModelRegistry, RegistryError
from service.settings import ServiceSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
OVERLAY_ALPHA = 0.5


class PredictError(ValueError):
    """A run that cannot start (no such model or version, no inputs), with the message to print."""


def choose_model(settings: ServiceSettings, spec: str | None, threads: int) -> ServedModel:
    """NAME[:VERSION] (default: the service's default model and its active version) -> a loaded model."""
    name, _, version = (spec or "").partition(":")
    registry = ModelRegistry(
        settings.models_dir,
        lambda directory: load_served_model(directory, threads, settings.execution_provider),
        settings.pinned_versions,
        settings.default_model,
    )
    registry.load_all()
    try:
        if not version:
            return registry.serving(name or None)
        state = registry.get(name or registry.default_name or "")
    except RegistryError as exc:
        raise PredictError(f"--model: {exc}") from None
    found = state.versions.get(version)
    if found is None:
        raise PredictError(f"--model: expected one of the versions {list(state.versions)}, got {version!r}")
    if found.model is None:
        raise PredictError(f"--model: {state.name}/{version} does not load: {found.error}")
    return found.model


@dataclass(frozen=True)
class Planned:
    source: Path
    mask: Path  # the mask (or JSON) it writes
    overlay: Path | None  # the overlay PNG it writes, with --overlay


def collect_inputs(inputs: Sequence[Path]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """(file, path relative to its input) for files and the images of folders (recursively, sorted),
    and the inputs that do not exist. Files given by name are taken whatever their suffix."""
    found: list[tuple[Path, Path]] = []
    missing: list[tuple[Path, str]] = []
    for given in inputs:
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((path, path.relative_to(given)))
        elif given.is_file():
            found.append((given, Path(given.name)))
        else:
            missing.append((given, "expected an image file or a folder, got nothing at this path"))
    return found, missing


def plan_outputs(
    found: Iterable[tuple[Path, Path]], out: Path, fmt: str, overlay: bool
) -> tuple[list[Planned], list[tuple[Path, str]]]:
    """Output paths keep each input's place below its folder: ``OUT/<relative>/<stem>.png|.json``. Two
    inputs that would write the same output (a.png and a.jpg) make the second an error, not a clash."""
    planned: list[Planned] = []
    clashes: list[tuple[Path, str]] = []
    taken: dict[Path, Path] = {}
    for source, relative in found:
        stem = out / relative.parent / relative.stem
        mask = stem.with_name(stem.name + (".png" if fmt == "png" else ".json"))
        extra = stem.with_name(stem.name + ".overlay.png") if overlay else None
        first = next((taken[p] for p in (mask, extra) if p is not None and p in taken), None)
        if first is not None:
            clashes.append((source, f"expected one input per output, got {first} writing {mask} too"))
            continue
        for p in (mask, extra):
            if p is not None:
                taken[p] = source
        planned.append(Planned(source, mask, extra))
    return planned, clashes


def overlay_image(
    rgb: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> bytes:
    """(H, W, 3) uint8 image, (H, W) class ids, (C, 3) colours -> PNG of the colours blended over it."""
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colors[mask].astype(np.float32) * alpha
    buffer = io.BytesIO()
    Image.fromarray(np.rint(blended).astype(np.uint8), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_new(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` at ``path``: atomically (a temporary file renamed) and, without ``overwrite``, only
    if nothing is there (FileExistsError otherwise, even when another process races us to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        with path.open("xb") as handle:
            handle.write(data)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Outcome:
    source: Path
    written: tuple[Path, ...] = ()
    skipped: str | None = None  # why nothing was written though nothing failed (outputs exist)
    error: str | None = None


def predict_one(model: ServedModel, item: Planned, opts: SegmentOptions, overwrite: bool) -> Outcome:
    targets = [p for p in (item.mask, item.overlay) if p is not None]
    if not overwrite and any(p.exists() for p in targets):
        return Outcome(item.source, skipped="output exists (--overwrite replaces it)")
    try:
        data = item.source.read_bytes()
    except OSError as exc:
        return Outcome(item.source, error=f"expected a readable file, got {exc.strerror or exc}")
    head = {"file": str(item.source), **opts.json_head}
    try:
        done = segment_bytes(model, data, replace(opts, json_head=head))
    except (ImageDecodeError, ImageTooLargeError) as exc:
        return Outcome(item.source, error=str(exc))
    written = []
    try:
        write_new(item.mask, done.body, overwrite)
        written.append(item.mask)
        if item.overlay is not None:
            rgb = decode_image(data, opts.max_pixels)
            mask = resize_nearest(done.decision.served, *done.size)
            write_new(item.overlay, overlay_image(rgb, mask, model.bundle.manifest.palette()), overwrite)
            written.append(item.overlay)
    except FileExistsError as exc:
        return Outcome(item.source, tuple(written), skipped=f"output exists: {exc.filename}")
    except OSError as exc:
        return Outcome(item.source, tuple(written), error=f"cannot write {exc.filename}: {exc.strerror}")
    return Outcome(item.source, tuple(written))


def predict_all(
    model: ServedModel,
    planned: Sequence[Planned],
    opts: SegmentOptions,
    overwrite: bool,
    jobs: int,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Every planned image in a pool of ``jobs`` threads; outcomes in input order."""
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="blda-predict") as pool:
        futures = [pool.submit(predict_one, model, item, opts, overwrite) for item in planned]
        outcomes = []
        for future in futures:
            outcome = future.result()
            if on_done is not None:
                on_done(outcome)
            outcomes.append(outcome)
    return outcomes
