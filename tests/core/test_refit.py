"""The one table refit (export, bundle create, live recalibration) and the PIT check, against loop twins."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from calibration.distributions import Gmm
from calibration.labels import IGNORE_INDEX
from calibration.refit import RefitConfig, refit_tables, select_pseudo_labels
from calibration.tables import build_calibration_tables, pit_check

C = 3


def _logits(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(C, 1, n) logits and (1, n) labels: class c's own logit ~ N(3 + c + shift, 1), others ~ N(0, 1)."""
    labels = rng.integers(0, C, size=n)
    z = rng.normal(0.0, 1.0, size=(C, n))
    z[labels, np.arange(n)] += 3.0 + labels + shift
    return z[:, None, :], labels[None, :]


def _select_loop(logits: np.ndarray, keep: float) -> np.ndarray:
    """Slow twin of select_pseudo_labels on (C, P)."""
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    pred, conf = p.argmax(0), p.max(0)
    out = np.full(pred.shape, IGNORE_INDEX)
    for c in range(logits.shape[0]):
        idx = [i for i in range(pred.size) if pred[i] == c]
        if not idx:
            continue
        threshold = np.quantile([conf[i] for i in idx], 1 - keep)
        for i in idx:
            if conf[i] >= threshold:
                out[i] = c
    return out


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.2])
def test_select_pseudo_labels_matches_a_loop(keep: float) -> None:
    z, _ = _logits(np.random.default_rng(0), 400)
    got = select_pseudo_labels(z[:, 0], keep)
    np.testing.assert_array_equal(got, _select_loop(z[:, 0], keep))
    if keep == 1.0:
        np.testing.assert_array_equal(got, z[:, 0].argmax(0))
    else:
        kept = got != IGNORE_INDEX
        assert kept.mean() == pytest.approx(keep, abs=0.02)
        # Per-class thresholds: every predicted class keeps pseudo-labels, not only the confident ones.
        assert set(np.unique(got[kept])) == set(np.unique(z[:, 0].argmax(0)))


def test_refit_takes_anchors_from_the_source_and_target_pairs_from_the_target() -> None:
    rng = np.random.default_rng(1)
    src_z, src_y = _logits(rng, 6000)
    cfg = RefitConfig(keep_fraction=1.0, min_row_pixels=10, components=2)
    near, _ = refit_tables(_logits(rng, 6000, shift=0.0)[0], cfg, src_z, src_y)
    far, _ = refit_tables(_logits(rng, 6000, shift=4.0)[0], cfg, src_z, src_y)
    np.testing.assert_allclose(near.anchor_pos.means, far.anchor_pos.means)
    np.testing.assert_allclose(near.anchor_neg.weights, far.anchor_neg.weights)
    # Positive logits 4 above the source: the target tables pull them down; the near ones barely move.
    mid = near.shifts.delta.shape[-1] // 2
    assert float(far.shifts.delta[1, 1, mid]) < -2.5
    assert abs(float(near.shifts.delta[1, 1, mid])) < 0.7
    other, _ = refit_tables(_logits(rng, 6000)[0], cfg, src_z + 2.0, src_y)
    assert not np.allclose(other.anchor_pos.means, near.anchor_pos.means)


def test_thin_target_rows_keep_the_fallback_row() -> None:
    rng = np.random.default_rng(2)
    src_z, src_y = _logits(rng, 3000)
    tgt_z, _ = _logits(rng, 3000, shift=3.0)
    # Remove every target pixel the model would call class 2.
    keep = tgt_z[:, 0].argmax(0) != 2
    tgt_z = tgt_z[:, :, keep]
    cfg = RefitConfig(keep_fraction=1.0, min_row_pixels=50, components=2)
    tables, report = refit_tables(tgt_z, cfg, src_z, src_y)
    assert report.fallback_rows.tolist() == [False, False, True] and report.target_pixels[2] == 0
    np.testing.assert_array_equal(tables.target.means[2], tables.source.means[2])
    np.testing.assert_array_equal(tables.target_counts[2], tables.source_counts[2])
    assert not np.allclose(tables.target.means[0], tables.source.means[0])
    assert np.any(tables.shifts.delta[2] != 0)  # a thin row still calibrates (with the source row)
    # Live recalibration: the current tables' rows serve instead, and the source pairs are kept.
    served = Gmm(tables.target.weights, tables.target.means + np.eye(C)[:, :, None] * 0.8, tables.target.stds)
    current = build_calibration_tables(tables.source, tables.source_counts, served, tables.target_counts)
    assert not np.allclose(current.target.means[2], current.source.means[2])
    live, report = refit_tables(tgt_z, cfg, fallback=current)
    np.testing.assert_array_equal(live.source.means, current.source.means)
    np.testing.assert_array_equal(live.target.means[2], current.target.means[2])
    with pytest.raises(ValueError, match="expected labelled source logits or fallback tables"):
        refit_tables(tgt_z, cfg)


def test_pit_check_matches_a_loop_and_is_flat_on_the_fitted_distribution() -> None:
    rng = np.random.default_rng(3)
    z, y = _logits(rng, 8000)
    cfg = RefitConfig(keep_fraction=1.0, components=3, min_row_pixels=10)
    tables, _ = refit_tables(z, cfg, z, y)
    fresh_z, fresh_y = _logits(rng, 4000)
    check = pit_check(fresh_z[:, 0], fresh_y[0], tables)
    t = tables.target
    for c in range(C):
        idx = np.flatnonzero(fresh_y[0] == c)
        # Independent twin: the target positive pair's mixture CDF, component by component.
        u = [
            sum(
                w * norm.cdf((fresh_z[c, 0, i] - m) / s)
                for w, m, s in zip(t.weights[c, c], t.means[c, c], t.stds[c, c], strict=True)
            )
            for i in idx
        ]
        assert check.pixels[c] == idx.size
        assert check.mean[c] == pytest.approx(np.mean(u), abs=1e-9)
    # Fitted on argmax pseudo-labels of the same kind of logits: the held-out PIT is close to uniform.
    assert check.deviation < 0.05
    shifted_z, shifted_y = _logits(rng, 4000, shift=1.5)
    high = pit_check(shifted_z[:, 0], shifted_y[0], tables)
    assert np.all(high.mean > 0.7)  # positive logits running above the tables: u runs high
    d = check.to_dict()
    assert d["pixels"] == check.pixels.tolist() and len(d["mean_u"]) == C
    with pytest.raises(ValueError, match="expected logits"):
        pit_check(fresh_z[:, 0, :10], fresh_y[0], tables)


def test_refit_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="keep_fraction: expected a value in"):
        RefitConfig(keep_fraction=0.0)
    with pytest.raises(ValueError, match="min_row_pixels: expected >= 1"):
        RefitConfig(min_row_pixels=0)


def test_the_calibration_default_is_on_only_where_it_beats_raw() -> None:
    from calibration.bias import calibration_default

    good = np.diag([50, 50, 50])  # every pixel right: mIoU 1
    worse = good.copy()
    worse[0, 0], worse[0, 1] = 40, 10  # class 0 pixels partly called 1: mIoU < 1
    chosen = calibration_default(worse, {0.1: worse, 0.2: good, 0.4: worse})
    assert chosen["tau"] == 0.2 and chosen["enabled"] is True
    assert chosen["raw_miou"] < chosen["calibrated_miou"]["0.2"] == 1.0
    # Calibration that only ties raw stays off; with nothing to compare, off.
    tie = calibration_default(good, {0.1: good, 0.2: worse})
    assert tie["tau"] == 0.1 and tie["enabled"] is False
    assert calibration_default(good, {})["enabled"] is False
