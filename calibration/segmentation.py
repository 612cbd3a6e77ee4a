"""Logits to masks: the one decision pipeline of the service, `blda predict` and `blda evaluate`.

logits (C, h, w) -> bilinear upsample (half-pixel centres, as torch's ``F.interpolate(...,
align_corners=False)`` and the networks' own upsampling) to the decision size -> raw argmax and the
calibrated rule on the *same* upsampled logits -> nearest resize of the decisions to the image.

Deciding on the logit grid and resizing the decision by nearest neighbour gives masks of stride-sized
blocks (16 x 16 pixels for a 512 x 1024 image on 32 x 64 logits); segmentation frameworks upsample the
logits before the argmax, and so do we. The decision size is capped (see :func:`decision_size`) because the
calibrated rule's cost grows with the pixels it decides; work runs in row bands, so extra memory is bounded
by the band, not the image.

numpy only: the service imports it without torch, training without fastapi.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibration.alignment import ShiftTables, calibrated_decision

# Pixels of decision per band (rows x width): bounds the upsampled logits held at once (C x this x 4 bytes,
# ~5 MB at 19 classes) whatever the image size.
DEFAULT_BAND_PIXELS = 65536


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output cells: the source cell holding the output cell's centre.

    Integer arithmetic, floor((i + 1/2) * src / dst), so that no centre falls on the wrong side of a
    boundary through rounding.
    """
    return (2 * np.arange(dst, dtype=np.int64) + 1) * src // (2 * dst)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) -> (height, width), nearest (pixel centres): decisions are resized this way, never logits."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = nearest_indices(h, height)
    cols = nearest_indices(w, width)
    # Two 1-D gathers: rows first (whole-row copies), then columns.
    return labels[rows][:, cols]


def bilinear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, frac) per output cell, each (dst,): out[i] = (1 - frac) src[i0] + frac src[i1].

    Half-pixel centres as torch with align_corners=False: x = (i + 1/2) src / dst - 1/2, clamped at 0
    below (torch clamps negative source coordinates; beyond the last cell i1 repeats i0).
    """
    x = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    np.maximum(x, 0.0, out=x)
    i0 = np.minimum(x.astype(np.int64), src - 1)  # floor, since x >= 0
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (x - i0).astype(np.float32)


def upsample_bilinear(
    logits: np.ndarray, size: tuple[int, int], rows: tuple[int, int] | None = None
) -> np.ndarray:
    """(C, h, w) -> (C, H, W) float32, bilinear with half-pixel centres; only output rows [r0, r1) if given.

    Separable: rows first (on the few source rows the band needs), then columns.
    """
    _, h, w = logits.shape
    height, width = size
    r0, r1 = rows if rows is not None else (0, height)
    z = np.asarray(logits, dtype=np.float32)
    ri0, ri1, rf = (t[r0:r1] for t in bilinear_taps(h, height))
    lo = int(ri0.min()) if r1 > r0 else 0
    hi = int(ri1.max()) + 1 if r1 > r0 else 0
    src = z[:, lo:hi]  # (C, k, w): the source rows this band reads
    top = src[:, ri0 - lo]  # (C, b, w)
    bottom = src[:, ri1 - lo]
    band = top + (bottom - top) * rf[None, :, None]  # (C, b, w)
    ci0, ci1, cf = bilinear_taps(w, width)
    left = band[:, :, ci0]  # (C, b, W)
    right = band[:, :, ci1]
    right -= left
    right *= cf
    right += left
    return right


def decision_size(image_size: tuple[int, int], input_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H', W') of the decision: the model's input size times ``scale``, at most the image's own size.

    Past the input size x 2 (stride-4 logits seen at 1/2 of their input pixel each way) bilinear
    interpolation adds no information, only pixels for the calibrated rule to decide; the nearest resize to
    the image that follows is then a resize of a smooth mask, not of 16-pixel blocks.
    """
    height, width = image_size
    return (
        max(1, min(height, round(input_size[0] * scale))),
        max(1, min(width, round(input_size[1] * scale))),
    )


@dataclass(frozen=True)
class Decisions:
    """Raw and calibrated decisions at the decision size (H', W') and the logits of their classes."""

    raw: np.ndarray  # (H', W') uint8 argmax of the upsampled logits
    raw_logit: np.ndarray  # (H', W') float32, the winning logit
    calibrated: tuple[np.ndarray, ...]  # per tau: (H', W') uint8
    calibrated_logit: tuple[np.ndarray, ...]  # per tau: (H', W') float32, the calibrated class's logit


def decide(
    logits: np.ndarray,
    size: tuple[int, int],
    shifts: ShiftTables | None = None,
    taus: Sequence[float] = (),
    band_pixels: int = DEFAULT_BAND_PIXELS,
) -> Decisions:
    """(C, h, w) logits -> decisions at ``size``: raw argmax and the calibrated rule at each tau, both on
    the same bilinearly upsampled logits, band by band (extra memory ~ C x band_pixels x 4 bytes)."""
    if taus and shifts is None:
        raise ValueError("taus: the calibrated decision needs shift tables, got none")
    if logits.ndim != 3:
        raise ValueError(f"expected logits (C, h, w), got shape {logits.shape}")
    c = logits.shape[0]
    if c > 256:
        raise ValueError(f"expected at most 256 classes (uint8 masks), got {c}")
    height, width = size
    raw = np.empty((height, width), np.uint8)
    raw_logit = np.empty((height, width), np.float32)
    cal = [np.empty((height, width), np.uint8) for _ in taus]
    cal_logit = [np.empty((height, width), np.float32) for _ in taus]
    step = max(1, band_pixels // max(width, 1))
    for r0 in range(0, height, step):
        r1 = min(height, r0 + step)
        up = upsample_bilinear(logits, size, (r0, r1))  # (C, b, W)
        top = up.argmax(axis=0)  # (b, W)
        raw[r0:r1] = top
        raw_logit[r0:r1] = np.take_along_axis(up, top[None], axis=0)[0]
        for i, tau in enumerate(taus):
            assert shifts is not None
            # One chunk per band: the band already bounds the memory.
            chosen = calibrated_decision(up, shifts, tau=tau, chunk_pixels=up.shape[1] * width)
            cal[i][r0:r1] = chosen
            cal_logit[i][r0:r1] = np.take_along_axis(up, chosen[None], axis=0)[0]
    return Decisions(raw, raw_logit, tuple(cal), tuple(cal_logit))
