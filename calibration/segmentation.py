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

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibration.alignment import ShiftTables, bound_slack, calibrated_decision, first_pass_margins

# Decisions are made at the model's input size times this (at most the image's size): the service's default
# setting, `blda evaluate`'s and `blda bundle create`'s, so that evaluated masks are served masks.
DEFAULT_DECISION_SCALE = 2.0
# Pixels of decision per band (rows x width): bounds the upsampled logits held at once (C x this x 4 bytes,
# ~5 MB at 19 classes) whatever the image size.
DEFAULT_BAND_PIXELS = 65536
# Pixels per call of the core's calibrated rule inside a band: its work arrays are a few (C, this).
CALIBRATION_CHUNK = 32768


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


def _corner_maps(
    z: np.ndarray, shifts: ShiftTables | None, taus: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """On the logit grid: raw top class (h, w), where interpolation cannot change the raw decision, and
    per tau where it cannot change the calibrated one (bool (h, w) each).

    Both margins of `first_pass_margins` are minima of linear functions of z for a fixed top class, so a
    margin that holds at the four logit pixels around an output pixel, with the same top class, holds at
    the output pixel: its raw decision is that class, and so is its calibrated decision (the exact
    bound's first pass settles it). The tolerances cover the float32 rounding of interpolation (~1e-7 |z|
    per operation) and the first pass's own slack, so a pixel taken as settled here is one the full path
    settles too.
    """
    c, h, w = z.shape
    flat = z.reshape(c, h * w)
    if shifts is None:
        shifts_for_raw = ShiftTables(
            np.zeros((c, c), np.float32), np.ones((c, c), np.float32), np.zeros((c, c, 2), np.float32)
        )
        top, raw_margin, _ = first_pass_margins(flat, shifts_for_raw, 0.0)
        cal_margins: list[np.ndarray] = []
    else:
        top, raw_margin, _ = first_pass_margins(flat, shifts, 0.0)
        cal_margins = [first_pass_margins(flat, shifts, tau)[2] for tau in taus]
    zmax = np.take_along_axis(flat, top[None], axis=0)[0]
    tol = 1e-5 * (1.0 + np.abs(zmax))
    raw_safe = raw_margin > tol
    cal_safe = [raw_safe & (m > 2.0 * bound_slack(zmax) + tol) for m in cal_margins]
    return top.reshape(h, w), raw_safe.reshape(h, w), [m.reshape(h, w) for m in cal_safe]


def _all_corners(
    grid: np.ndarray, r: tuple[np.ndarray, np.ndarray], cl: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """(h, w) bool -> (b, W): true where all four logit pixels around the output pixel are."""
    (r0, r1), (c0, c1) = r, cl
    top, bottom = grid[r0], grid[r1]  # (b, w)
    return top[:, c0] & top[:, c1] & bottom[:, c0] & bottom[:, c1]


def _interpolate_at(
    zt: np.ndarray,
    w: int,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray, np.ndarray],
    pick_r: np.ndarray,
    pick_c: np.ndarray,
) -> np.ndarray:
    """zt (h*w, C) pixel-major logits -> (C, Q): the upsampled logits at output pixels (pick_r, pick_c) of
    a band, with the arithmetic of `upsample_bilinear` in the same order (bit-identical values).
    Pixel-major rows make each corner one contiguous gather of C floats."""
    ri0, ri1, rf = (t[pick_r] for t in rows)
    ci0, ci1, cf = (t[pick_c] for t in cols)
    rf, cf = rf[:, None], cf[:, None]
    # In place, two (Q, C) temporaries at a time; (x - a) * f + a is a + (x - a) * f exactly.
    a = zt[ri0 * w + ci0]  # (Q, C)
    left = zt[ri1 * w + ci0]
    left -= a
    left *= rf
    left += a
    b = zt[ri0 * w + ci1]
    right = zt[ri1 * w + ci1]
    right -= b
    right *= rf
    right += b
    del a, b
    right -= left
    right *= cf
    right += left
    return np.ascontiguousarray(right.T)


_OFFSET_TABLES: dict[tuple[int, float, bytes], tuple[weakref.ref[ShiftTables], ShiftTables]] = {}
_OFFSET_LOCK = threading.Lock()


def offset_tables(shifts: ShiftTables, offset: np.ndarray, tau: float) -> ShiftTables:
    """Tables whose calibrated rule at ``tau`` adds ``offset`` b (C,) inside every hypothesis's softmax:
    z_l + τ(Δ_cl(z_l) + b_l / τ) = z_l + τΔ_cl(z_l) + b_l. A per-pair constant is still a table, so the
    exact bound and its shortcuts hold unchanged. Cached per (tables, tau, offset): a server reuses one."""
    if tau <= 0:
        raise ValueError(f"tau: expected > 0 for an offset inside the calibrated rule, got {tau}")
    b = np.asarray(offset, dtype=np.float32).reshape(-1)
    if b.shape != (shifts.num_classes,):
        raise ValueError(f"offset: expected shape ({shifts.num_classes},), got {np.shape(offset)}")
    key = (id(shifts), float(tau), b.tobytes())
    with _OFFSET_LOCK:
        hit = _OFFSET_TABLES.get(key)
    if hit is not None and hit[0]() is shifts:
        return hit[1]
    made = ShiftTables(
        shifts.lo, shifts.step, (shifts.delta + (b / np.float32(tau))[None, :, None]).astype(np.float32)
    )
    with _OFFSET_LOCK:
        while len(_OFFSET_TABLES) >= 8:
            _OFFSET_TABLES.pop(next(iter(_OFFSET_TABLES)))
        _OFFSET_TABLES[key] = (weakref.ref(shifts), made)
    return made


def _decide_with_offset(
    logits: np.ndarray,
    size: tuple[int, int],
    shifts: ShiftTables | None,
    taus: Sequence[float],
    offset: np.ndarray,
    band_pixels: int,
    shortcut: bool,
) -> Decisions:
    b = np.asarray(offset, dtype=np.float32).reshape(-1)
    if b.shape != (logits.shape[0],):
        raise ValueError(f"offset: expected shape ({logits.shape[0]},), got {np.shape(offset)}")
    if shifts is None:
        if taus:
            raise ValueError("taus: the calibrated decision needs shift tables, got none")
        raw = decide(logits, size, band_pixels=band_pixels, shortcut=shortcut)
        # An offset commutes with bilinear upsampling (weights sum to 1): the argmax of the offset logits.
        moved = decide(
            np.asarray(logits, np.float32) + b[:, None, None],
            size,
            band_pixels=band_pixels,
            shortcut=shortcut,
        )
        logit = moved.raw_logit - b[moved.raw]  # the logit itself, not the offset one
        return Decisions(raw.raw, raw.raw_logit, (moved.raw,), (logit,))
    if not taus:
        raise ValueError("offset with shift tables: expected at least one tau, got none")
    made = [decide(logits, size, offset_tables(shifts, b, t), (t,), band_pixels, shortcut) for t in taus]
    return Decisions(
        made[0].raw,
        made[0].raw_logit,
        tuple(m.calibrated[0] for m in made),
        tuple(m.calibrated_logit[0] for m in made),
    )


def decide(
    logits: np.ndarray,
    size: tuple[int, int],
    shifts: ShiftTables | None = None,
    taus: Sequence[float] = (),
    band_pixels: int = DEFAULT_BAND_PIXELS,
    shortcut: bool = True,
    offset: np.ndarray | None = None,
) -> Decisions:
    """(C, h, w) logits -> decisions at ``size``: raw argmax and the calibrated rule at each tau, both on
    the same bilinearly upsampled logits, band by band (extra memory ~ C x band_pixels x 4 bytes).

    With ``shortcut`` (the default), output pixels whose four surrounding logit pixels are all settled
    with the same class (see `_corner_maps`) take that class without their logits being upsampled; only
    the others (near class boundaries) are interpolated and decided. Same result as ``shortcut=False``,
    which upsamples every pixel (the reference).

    ``offset`` b (C,) is the per-class offset of the classical corrections (calibration.calibrators):
    without tables, the one calibrated decision is argmax_c (z_c + b_c); with tables, each hypothesis's
    softmax of the calibrated rule gets it (z_l + τΔ_cl(z_l) + b_l, see `offset_tables`). The raw decision
    never does.
    """
    if offset is not None:
        return _decide_with_offset(logits, size, shifts, taus, offset, band_pixels, shortcut)
    if taus and shifts is None:
        raise ValueError("taus: the calibrated decision needs shift tables, got none")
    if logits.ndim != 3:
        raise ValueError(f"expected logits (C, h, w), got shape {logits.shape}")
    c, h, w = logits.shape
    if c > 256:
        raise ValueError(f"expected at most 256 classes (uint8 masks), got {c}")
    z = np.ascontiguousarray(logits, dtype=np.float32)
    height, width = size
    raw = np.empty((height, width), np.uint8)
    raw_logit = np.empty((height, width), np.float32)
    cal = [np.empty((height, width), np.uint8) for _ in taus]
    cal_logit = [np.empty((height, width), np.float32) for _ in taus]
    rows_all = bilinear_taps(h, height)
    cols = bilinear_taps(w, width)
    if shortcut:
        top, raw_safe, cal_safe = _corner_maps(z, shifts, taus)
        winner = np.take_along_axis(z, top[None], axis=0)  # (1, h, w): z_t, the logit grid's max
        zt = np.ascontiguousarray(z.reshape(c, h * w).T)  # (h*w, C) pixel-major
    step = max(1, band_pixels // max(width, 1))
    for r0 in range(0, height, step):
        r1 = min(height, r0 + step)
        if not shortcut:
            up = upsample_bilinear(z, size, (r0, r1))  # (C, b, W)
            best = up.argmax(axis=0)  # (b, W)
            raw[r0:r1] = best
            raw_logit[r0:r1] = np.take_along_axis(up, best[None], axis=0)[0]
            for i, tau in enumerate(taus):
                assert shifts is not None
                chosen = calibrated_decision(up, shifts, tau=tau, chunk_pixels=up.shape[1] * width)
                cal[i][r0:r1] = chosen
                cal_logit[i][r0:r1] = np.take_along_axis(up, chosen[None], axis=0)[0]
            continue
        rows = (rows_all[0][r0:r1], rows_all[1][r0:r1], rows_all[2][r0:r1])
        corner_r = (rows[0], rows[1])
        corner_c = (cols[0], cols[1])
        t00 = top[rows[0]][:, cols[0]]  # (b, W) the class of the upper-left logit pixel
        same = (
            (t00 == top[rows[0]][:, cols[1]])
            & (t00 == top[rows[1]][:, cols[0]])
            & (t00 == top[rows[1]][:, cols[1]])
        )
        settled_raw = same & _all_corners(raw_safe, corner_r, corner_c)
        settled_cal = [same & _all_corners(m, corner_r, corner_c) for m in cal_safe]
        win = upsample_bilinear(winner, size, (r0, r1))[0]  # (b, W): the upsampled z_t
        raw[r0:r1] = t00
        raw_logit[r0:r1] = win
        for i in range(len(taus)):
            cal[i][r0:r1] = t00
            cal_logit[i][r0:r1] = win
        needed = ~settled_raw
        for m in settled_cal:
            needed |= ~m
        pick = np.flatnonzero(needed)  # flat indices into the (b, W) band
        if pick.size == 0:
            continue
        pick_r, pick_c = np.divmod(pick, width)
        up_q = _interpolate_at(zt, w, rows, cols, pick_r, pick_c)  # (C, Q)
        best = up_q.argmax(axis=0)
        raw[r0:r1].reshape(-1)[pick] = best
        raw_logit[r0:r1].reshape(-1)[pick] = np.take_along_axis(up_q, best[None], axis=0)[0]
        for i, tau in enumerate(taus):
            assert shifts is not None
            sub = np.flatnonzero(~settled_cal[i].reshape(-1)[pick])  # those the shortcut did not settle
            if sub.size == 0:
                continue
            zq = np.ascontiguousarray(up_q[:, sub])[:, None, :]  # (C, 1, Q')
            chosen = calibrated_decision(zq, shifts, tau=tau, chunk_pixels=CALIBRATION_CHUNK)[0]
            cal[i][r0:r1].reshape(-1)[pick[sub]] = chosen
            cal_logit[i][r0:r1].reshape(-1)[pick[sub]] = np.take_along_axis(zq[:, 0], chosen[None], axis=0)[0]
    return Decisions(raw, raw_logit, tuple(cal), tuple(cal_logit))
