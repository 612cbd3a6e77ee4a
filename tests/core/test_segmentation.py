"""The decision pipeline (calibration.segmentation): bilinear upsample, decisions on upsampled logits, bands.

Each vectorised step has a slow per-pixel twin here; the torch parity of the upsample is in
tests/training/test_evaluate.py (torch is not a core dependency).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_alignment import (
    assert_same_decision,
    near_constant_tables,
    random_logits,
    random_tables,
    reference_decision,
)

from calibration.segmentation import decide, decision_size, resize_nearest, upsample_bilinear


def reference_upsample(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """One output pixel at a time: half-pixel centres, source coordinates clamped at 0 and the last cell."""
    c, h, w = logits.shape
    out = np.empty((c, height, width))
    for i in range(height):
        y = max((i + 0.5) * h / height - 0.5, 0.0)
        y0 = min(int(np.floor(y)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = y - y0
        for j in range(width):
            x = max((j + 0.5) * w / width - 0.5, 0.0)
            x0 = min(int(np.floor(x)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = x - x0
            out[:, i, j] = (1 - fy) * ((1 - fx) * logits[:, y0, x0] + fx * logits[:, y0, x1]) + fy * (
                (1 - fx) * logits[:, y1, x0] + fx * logits[:, y1, x1]
            )
    return out


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    height=st.integers(1, 23),
    width=st.integers(1, 23),
    seed=st.integers(0, 2**16),
)
def test_upsample_equals_the_per_pixel_loop(h: int, w: int, height: int, width: int, seed: int) -> None:
    logits = np.random.default_rng(seed).normal(0, 3, (3, h, w)).astype(np.float32)
    got = upsample_bilinear(logits, (height, width))
    np.testing.assert_allclose(got, reference_upsample(logits, height, width), rtol=1e-5, atol=1e-5)


def test_upsample_by_row_bands_equals_the_whole() -> None:
    logits = np.random.default_rng(1).normal(0, 3, (4, 9, 13)).astype(np.float32)
    whole = upsample_bilinear(logits, (37, 50))
    bands = np.concatenate(
        [upsample_bilinear(logits, (37, 50), (r, min(37, r + 5))) for r in range(0, 37, 5)], 1
    )
    np.testing.assert_array_equal(bands, whole)


def test_upsampling_at_the_same_size_is_the_identity() -> None:
    logits = np.random.default_rng(2).normal(0, 3, (3, 6, 8)).astype(np.float32)
    np.testing.assert_array_equal(upsample_bilinear(logits, (6, 8)), logits)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_decisions_are_made_on_the_upsampled_logits(tau: float) -> None:
    """Raw: the argmax of the slow upsample; calibrated: the slow per-pixel rule on the same logits."""
    rng = np.random.default_rng(3)
    c = 5
    tables = random_tables(rng, c)
    logits = random_logits(rng, c, 3, 4, spread=1.0)
    size = (9, 11)
    # Small bands: several bands per image, one of them partial.
    got = decide(logits, size, tables, (tau,), band_pixels=2 * size[1])
    up = reference_upsample(logits.astype(np.float64), *size)
    ref_raw = up.argmax(0)
    ref_cal, gap = reference_decision(up.astype(np.float32), tables, tau)
    top2 = np.sort(up, axis=0)[-2:]
    assert_same_decision(got.raw.astype(np.int64), ref_raw, top2[1] - top2[0])
    assert_same_decision(got.calibrated[0].astype(np.int64), ref_cal, gap)
    assert (got.calibrated[0] != got.raw).any(), "the case must exercise calibration"
    np.testing.assert_allclose(got.raw_logit, up.max(0), rtol=1e-5, atol=1e-5)
    chosen = np.take_along_axis(up, got.calibrated[0][None].astype(np.intp), 0)[0]
    np.testing.assert_allclose(got.calibrated_logit[0], chosen, rtol=1e-5, atol=1e-5)


def test_band_size_does_not_change_the_decisions() -> None:
    rng = np.random.default_rng(4)
    tables = random_tables(rng, 6)
    logits = random_logits(rng, 6, 8, 10, spread=1.0)
    whole = decide(logits, (31, 40), tables, (0.2, 0.5), band_pixels=10**9)
    banded = decide(logits, (31, 40), tables, (0.2, 0.5), band_pixels=3 * 40)
    for a, b in zip(
        (whole.raw, *whole.calibrated, whole.raw_logit),
        (banded.raw, *banded.calibrated, banded.raw_logit),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_decision_size_is_the_scaled_input_capped_at_the_image() -> None:
    assert decision_size((512, 1024), (128, 256), 2.0) == (256, 512)
    assert decision_size((200, 300), (128, 256), 2.0) == (200, 300)  # a small image: its own size
    assert decision_size((1024, 2048), (128, 256), 1.0) == (128, 256)


def test_nearest_resize_of_the_decision() -> None:
    labels = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(resize_nearest(labels, 4, 6), labels.repeat(2, 0).repeat(2, 1))


def smooth_logits(rng: np.random.Generator, c: int, h: int, w: int, slope: float = 0.5) -> np.ndarray:
    """Regions of confident classes with ambiguous boundaries: what a segmentation network's logits are."""
    y, x = np.mgrid[0:h, 0:w]
    centres = rng.uniform(0, 1, (c, 2)) * (h, w)
    dist = np.hypot(y[None] - centres[:, 0, None, None], x[None] - centres[:, 1, None, None])
    return (-dist * slope + rng.normal(0, 0.7, (c, h, w))).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_the_shortcut_gives_the_full_paths_decisions_bit_for_bit(seed: int) -> None:
    """Pixels settled from their four logit-grid neighbours: identical decisions and logits to
    upsampling every pixel, raw and calibrated, on smooth and on tied (integer) logits."""
    rng = np.random.default_rng(seed)
    c = 7
    # Nearly constant shifts make the bound nearly tight: decisions flip right at the shortcut's edge.
    tables = near_constant_tables(rng, c) if seed % 2 else random_tables(rng, c, scale=0.5)
    cases = [
        smooth_logits(rng, c, 9, 13),
        smooth_logits(rng, c, 9, 13, slope=0.1),
        np.round(random_logits(rng, c, 6, 7, spread=1.0)),
    ]
    for logits in cases:
        for size in [(36, 52), (17, 29), (9, 13)]:
            fast = decide(logits, size, tables, (0.2, 1.0), band_pixels=7 * size[1])
            full = decide(logits, size, tables, (0.2, 1.0), shortcut=False)
            np.testing.assert_array_equal(fast.raw, full.raw)
            np.testing.assert_array_equal(fast.raw_logit, full.raw_logit)
            for a, b in zip(
                fast.calibrated + fast.calibrated_logit, full.calibrated + full.calibrated_logit, strict=True
            ):
                np.testing.assert_array_equal(a, b)
    plain = decide(cases[0], (36, 52))
    np.testing.assert_array_equal(plain.raw, decide(cases[0], (36, 52), shortcut=False).raw)


@pytest.mark.parametrize("seed", range(6))
def test_the_raw_decision_alone_gives_the_full_paths_bit_for_bit(seed: int) -> None:
    """Raw only (no tau, the uncalibrated request): the same argmax and winning logit as upsampling every
    pixel, ties (integer logits) included: the lowest tied class wins in both."""
    rng = np.random.default_rng(seed)
    cases = [
        smooth_logits(rng, 7, 9, 13),
        smooth_logits(rng, 19, 8, 16, slope=0.1),
        np.round(random_logits(rng, 7, 6, 7, spread=1.0)),
        np.round(random_logits(rng, 5, 6, 7, spread=0.3)),  # many exact ties
    ]
    for logits in cases:
        for size in [(36, 52), (17, 29), (9, 13), (64, 100)]:
            fast = decide(logits, size, band_pixels=7 * size[1])
            full = decide(logits, size, shortcut=False)
            np.testing.assert_array_equal(fast.raw, full.raw)
            np.testing.assert_array_equal(fast.raw_logit, full.raw_logit)


def test_the_shortcut_settles_most_pixels_of_smooth_logits() -> None:
    """Not a correctness property: the reason for the shortcut (few pixels near boundaries are upsampled)."""
    rng = np.random.default_rng(9)
    logits = smooth_logits(rng, 7, 16, 32)
    from calibration.segmentation import _corner_maps

    _, raw_safe, _ = _corner_maps(logits, None, ())
    assert raw_safe.mean() > 0.5
