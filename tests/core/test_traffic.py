"""calibration.traffic: served pixels sampled as the decision sees them, and the refit from them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from calibration.refit import RefitConfig, refit_tables
from calibration.segmentation import upsample_bilinear
from calibration.traffic import (
    TrafficSample,
    decode_sample,
    encode_sample,
    merge_samples,
    refit_from_traffic,
    sample_decision_pixels,
)


@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    scale_h=st.integers(1, 5),
    scale_w=st.integers(1, 5),
    count=st.integers(1, 40),
    seed=st.integers(0, 10),
)
def test_sampled_pixels_are_those_of_the_upsampled_logits(
    h: int, w: int, scale_h: int, scale_w: int, count: int, seed: int
) -> None:
    """Reference: the decision's own full upsampling, read at the same drawn positions."""
    logits = np.random.default_rng(seed).normal(0, 3, (4, h, w)).astype(np.float32)
    size = (h * scale_h + seed % 2, w * scale_w)
    got = sample_decision_pixels(logits, size, count, np.random.default_rng(seed))
    total = size[0] * size[1]
    picked = np.random.default_rng(seed).choice(total, size=min(count, total), replace=False)
    full = upsample_bilinear(logits, size).reshape(4, -1)  # (C, H' W')
    np.testing.assert_allclose(got, full[:, picked], rtol=1e-5, atol=1e-5)


def test_sampling_draws_distinct_positions_and_at_most_the_grid() -> None:
    logits = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    got = sample_decision_pixels(logits, (2, 3), 100, np.random.default_rng(0))  # the grid itself
    assert got.shape == (2, 6)
    np.testing.assert_array_equal(np.sort(got[0]), np.sort(logits[0].ravel()))


def test_sample_round_trips_through_bytes_and_merges() -> None:
    a = TrafficSample(np.ones((3, 4), np.float32), 10.0, 20.0, 2)
    b = TrafficSample(np.zeros((3, 2), np.float32), 5.0, 15.0, 1)
    back = decode_sample(encode_sample(a))
    np.testing.assert_array_equal(back.pixels, a.pixels)
    assert (back.first_s, back.last_s, back.requests) == (10.0, 20.0, 2)
    merged = merge_samples([a, b], 3)
    assert merged.pixels.shape == (3, 6) and (merged.first_s, merged.last_s, merged.requests) == (
        5.0,
        20.0,
        3,
    )
    with pytest.raises(ValueError, match="expected traffic pixels of 4 classes"):
        merge_samples([a], 4)
    with pytest.raises(ValueError, match="expected an npz"):
        decode_sample(b"not an npz")


def _pixels(rng: np.random.Generator, counts: list[int], shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(C, P) logits whose own-class logit is high (+ shift), and their classes (P,)."""
    c = len(counts)
    labels = np.repeat(np.arange(c), counts)
    z = rng.normal(0.0, 1.0, (c, labels.size))
    z[labels, np.arange(labels.size)] += 4.0 + shift
    return z.astype(np.float32), labels


def test_refit_from_traffic_is_the_core_refit_with_the_current_tables_as_fallback() -> None:
    rng = np.random.default_rng(0)
    source, labels = _pixels(rng, [3000, 3000, 3000], 0.0)
    config = RefitConfig(components=2, max_samples=3000, min_row_pixels=500, num_knots=32)
    current, _ = refit_tables(source[:, None, :], config, source[:, None, :], labels[None, :])
    traffic, _ = _pixels(rng, [3000, 3000, 100], 2.0)  # drift: own-class logits 2 higher; class 2 thin
    tables, refit = refit_from_traffic(traffic, current, config, held_out_fraction=0.2)

    held = np.random.default_rng(config.seed).random(traffic.shape[1]) < 0.2
    expected, _ = refit_tables(traffic[:, ~held][:, None, :], config, fallback=current)
    np.testing.assert_array_equal(tables.target.means, expected.target.means)
    # Source pairs and anchors stay the current tables'; the thin row keeps the current row.
    np.testing.assert_array_equal(tables.source.means, current.source.means)
    np.testing.assert_array_equal(tables.anchor_pos.means, current.anchor_pos.means)
    assert refit.fallback_rows.tolist() == [False, False, True]
    np.testing.assert_array_equal(tables.target.means[2], current.target.means[2])
    assert not np.allclose(tables.target.means[0], current.target.means[0])
    # The drift shows in the PIT of held-out traffic, and the refit removes it on the refitted rows.
    before, after = refit.pit_before.mean, refit.pit_after.mean
    assert before[0] > 0.8 and before[1] > 0.8
    assert abs(after[0] - 0.5) < 0.05 and abs(after[1] - 0.5) < 0.05
    assert refit.held_out_pixels == int(held.sum())


def test_refit_from_traffic_names_a_wrong_shape() -> None:
    rng = np.random.default_rng(0)
    source, labels = _pixels(rng, [600, 600], 0.0)
    config = RefitConfig(components=2, max_samples=600, num_knots=16)
    current, _ = refit_tables(source[:, None, :], config, source[:, None, :], labels[None, :])
    with pytest.raises(ValueError, match=r"expected traffic pixels \(2, P\)"):
        refit_from_traffic(np.zeros((3, 10), np.float32), current, config)
