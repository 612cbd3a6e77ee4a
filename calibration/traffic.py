"""Pixels of served logits, sampled for the live refit of target tables (numpy only).

The exporter refits target tables on eval-mode logits upsampled to where the decision is made
(training/tables.py samples pixels of the upsampled logits uniformly). The service samples its traffic
the same way: uniform positions of the decision grid, their logit vectors interpolated bilinearly from
the model's logits with the decision's own taps (calibration.segmentation.bilinear_taps), so live and
offline refits see the same kind of pixels. Chunks of such samples travel through the service's shared
state (mergeable across workers) and, as a `.npz` file, to `blda bundle recalibrate` offline.

A sample is a (C, P) float32 array of logit vectors; its pseudo-labels are their argmax (the refit's).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from calibration.refit import RefitConfig, refit_tables
from calibration.segmentation import bilinear_taps
from calibration.tables import CalibrationTables, PitCheck, pit_check


@dataclass(frozen=True)
class TrafficSample:
    """Sampled pixels of served traffic and where they came from."""

    pixels: np.ndarray  # (C, P) float32 logit vectors
    first_s: float  # unix time of the oldest request sampled
    last_s: float  # unix time of the newest
    requests: int  # requests sampled

    @property
    def num_pixels(self) -> int:
        return int(self.pixels.shape[1])


def sample_decision_pixels(
    logits: np.ndarray,  # (C, h, w) the model's logits
    size: tuple[int, int],  # (H', W') the decision size
    count: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(C, P) float32, P = min(count, H' W'): the logits upsampled bilinearly to ``size`` (half-pixel
    centres, as the decision) at uniformly drawn distinct positions, without upsampling the rest."""
    if logits.ndim != 3:
        raise ValueError(f"expected logits (C, h, w), got shape {logits.shape}")
    _, h, w = logits.shape
    height, width = size
    total = height * width
    picked = rng.choice(total, size=min(count, total), replace=False)  # (P,) flat decision positions
    rows, cols = np.divmod(picked, width)
    r0, r1, rf = (t[rows] for t in bilinear_taps(h, height))  # (P,) each
    c0, c1, cf = (t[cols] for t in bilinear_taps(w, width))
    z = np.asarray(logits, dtype=np.float32)
    top = z[:, r0, c0] + (z[:, r0, c1] - z[:, r0, c0]) * cf  # (C, P): rows first, as upsample_bilinear
    bottom = z[:, r1, c0] + (z[:, r1, c1] - z[:, r1, c0]) * cf
    return np.asarray(top + (bottom - top) * rf, dtype=np.float32)


def encode_sample(sample: TrafficSample) -> bytes:
    """npz bytes (for the shared state or a file)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        pixels=np.asarray(sample.pixels, np.float32),
        window=np.array([sample.first_s, sample.last_s], np.float64),
        requests=np.array(sample.requests, np.int64),
    )
    return buffer.getvalue()


def decode_sample(data: bytes, source: str = "traffic sample") -> TrafficSample:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            pixels = np.asarray(arrays["pixels"], np.float32)
            window = np.asarray(arrays["window"], np.float64)
            requests = int(arrays["requests"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{source}: expected an npz with pixels, window, requests, got: {exc}") from exc
    if pixels.ndim != 2 or window.shape != (2,):
        raise ValueError(
            f"{source}: expected pixels (C, P) and window (2,), got {pixels.shape}, {window.shape}"
        )
    return TrafficSample(pixels, float(window[0]), float(window[1]), requests)


def merge_samples(samples: Iterable[TrafficSample], num_classes: int) -> TrafficSample:
    """One sample from chunks of any workers (pixels concatenated; the window spans them all)."""
    chunks = list(samples)
    bad = [s.pixels.shape for s in chunks if s.pixels.shape[0] != num_classes]
    if bad:
        raise ValueError(f"expected traffic pixels of {num_classes} classes, got shapes {bad}")
    if not chunks:
        return TrafficSample(np.zeros((num_classes, 0), np.float32), 0.0, 0.0, 0)
    return TrafficSample(
        np.concatenate([s.pixels for s in chunks], axis=1),
        min(s.first_s for s in chunks),
        max(s.last_s for s in chunks),
        sum(s.requests for s in chunks),
    )


def save_sample(path: str | Path, sample: TrafficSample) -> Path:
    target = Path(path)
    target.write_bytes(encode_sample(sample))
    return target


def load_sample(path: str | Path) -> TrafficSample:
    return decode_sample(Path(path).read_bytes(), str(path))


@dataclass(frozen=True)
class TrafficRefit:
    """What a refit from traffic did, for the new bundle's provenance."""

    pixels_per_class: np.ndarray  # (C,) int64 fitted pixels per pseudo-label (argmax) class
    fallback_rows: np.ndarray  # (C,) bool: rows that kept the current tables (too few pixels)
    pit_before: PitCheck  # held-out traffic pixels (argmax pseudo-labels) under the current tables
    pit_after: PitCheck  # the same pixels under the refitted tables
    held_out_pixels: int

    def to_dict(self, class_names: Sequence[str]) -> dict[str, object]:
        return {
            "pixels_per_class": {n: int(v) for n, v in zip(class_names, self.pixels_per_class, strict=True)},
            "kept_current_rows": [n for n, thin in zip(class_names, self.fallback_rows, strict=True) if thin],
            "held_out_pixels": self.held_out_pixels,
            "pit_before": self.pit_before.to_dict(),
            "pit_after": self.pit_after.to_dict(),
        }


def refit_from_traffic(
    pixels: np.ndarray,  # (C, P) sampled traffic logits
    current: CalibrationTables,
    config: RefitConfig,
    held_out_fraction: float = 0.2,
) -> tuple[CalibrationTables, TrafficRefit]:
    """Target tables refitted on traffic by the core refit (source pairs, anchors and thin rows from
    ``current``), and the PIT check before and after on a held-out share of the pixels. The mixture size,
    knot count and eps are the current tables' (their rows are mixed with the refitted ones).

    Traffic has no labels, so the PIT check uses the argmax as the class: it says how well each table
    describes the logits the model now produces, not whether the decisions are right."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction: expected a value in [0, 1), got {held_out_fraction}")
    c = current.num_classes
    if pixels.ndim != 2 or pixels.shape[0] != c:
        raise ValueError(f"expected traffic pixels ({c}, P), got shape {pixels.shape}")
    config = replace(
        config,
        components=int(current.target.weights.shape[-1]),
        num_knots=current.shifts.num_knots,
        eps=current.eps,
    )
    rng = np.random.default_rng(config.seed)
    held = np.asarray(rng.random(pixels.shape[1]) < held_out_fraction)  # (P,) bool
    fit, check = pixels[:, ~held], pixels[:, held]
    # (C, P) -> (C, 1, P): the (C, H, W) layout the refit takes.
    tables, report = refit_tables(fit[:, None, :], config, fallback=current)
    labels = check.argmax(0)
    return tables, TrafficRefit(
        pixels_per_class=report.target_pixels,
        fallback_rows=report.fallback_rows,
        pit_before=pit_check(check, labels, current),
        pit_after=pit_check(check, labels, tables),
        held_out_pixels=int(held.sum()),
    )
