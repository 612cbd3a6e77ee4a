"""CalibrationTables: building, the validated array form, and the quantiles used by live monitoring."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.alignment import calibrated_decision
from calibration.distributions import Gmm, fit_pair_gmms, gmm_cdf
from calibration.tables import (
    CalibrationFormatError,
    CalibrationTables,
    anchor_quantile,
    build_calibration_tables,
    positive_quantile,
)

C = 5


def _pairs(seed: int) -> tuple[Gmm, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, (2, 20, 30))
    offset = rng.normal(0, 1, C)
    logits = rng.normal(0, 1, (2, C, 20, 30)) + offset[None, :, None, None]
    logits += 5 * np.eye(C)[labels].transpose(0, 3, 1, 2)
    return fit_pair_gmms(logits, labels, C, k=3)


@pytest.fixture(scope="module")
def tables() -> CalibrationTables:
    source, sc = _pairs(0)
    target, tc = _pairs(1)
    return build_calibration_tables(source, sc, target, tc, num_knots=64, eps=0.02)


def test_build_uses_source_anchors_and_target_shifts(tables: CalibrationTables) -> None:
    assert tables.num_classes == C and tables.eps == 0.02
    assert tables.shifts.delta.shape == (C, C, 64) and tables.shifts.delta.dtype == np.float32
    own = build_calibration_tables(tables.source, tables.source_counts, num_knots=64, eps=0.02)
    assert own.target is own.source  # no target: the source pairs are aligned to their own anchors
    assert not np.allclose(own.shifts.delta, tables.shifts.delta)


def test_array_round_trip_is_exact(tables: CalibrationTables) -> None:
    arrays = tables.to_arrays()
    back = CalibrationTables.from_arrays(arrays)
    for key, value in back.to_arrays().items():
        np.testing.assert_array_equal(value, arrays[key])
        assert value.dtype == arrays[key].dtype
    z = np.random.default_rng(2).normal(0, 3, (C, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(calibrated_decision(z, back.shifts), calibrated_decision(z, tables.shifts))


@pytest.mark.parametrize(
    ("field", "damage", "message"),
    [
        ("shift_delta", None, "missing"),
        (
            "source_means",
            np.zeros((C, C)),
            r"expected a float array of shape \(5, 5, 3\), got shape \(5, 5\)",
        ),
        ("target_counts", np.zeros((C, C)), "expected an int array of shape"),
        ("target_counts", -np.ones((C, C), np.int64), "expected counts >= 0"),
        ("anchor_pos_stds", "neg", "expected stds > 0"),
        ("source_weights", "unnormalised", "summing to 1"),
        ("shift_step", "zero", "expected knot spacings > 0"),
        ("shift_lo", "nan", "expected finite values"),
        ("shift_delta", np.zeros((C, C + 1, 4), np.float32), r"expected shape \(C, C, M\)"),
        ("eps", np.array(0.7), r"expected a value in \(0, 0.5\)"),
        ("anchor_neg_means", np.zeros(3), "expected a float array of shape"),
    ],
)
def test_from_arrays_names_the_bad_field(
    tables: CalibrationTables, field: str, damage: object, message: str
) -> None:
    arrays = tables.to_arrays()
    if damage is None:
        del arrays[field]
    elif isinstance(damage, np.ndarray):
        arrays[field] = damage
    elif damage == "neg":
        arrays[field] = -arrays[field]
    elif damage == "unnormalised":
        arrays[field] = arrays[field] * 2
    elif damage == "zero":
        arrays[field] = np.zeros_like(arrays[field])
    elif damage == "nan":
        arrays[field] = np.full_like(arrays[field], np.nan)
    with pytest.raises(CalibrationFormatError, match=message) as info:
        CalibrationTables.from_arrays(arrays)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_positive_and_anchor_quantiles(tables: CalibrationTables) -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(4, 2, 100)
    cls = rng.integers(0, C, 100)
    u = positive_quantile(z, cls, tables)
    for i in range(100):
        assert u[i] == pytest.approx(gmm_cdf(z[i : i + 1], tables.target[cls[i], cls[i]])[0], abs=1e-12)
    np.testing.assert_allclose(anchor_quantile(z, tables), gmm_cdf(z, tables.anchor_pos))
    with pytest.raises(ValueError, match=r"expected classes in \[0, 5\)"):
        positive_quantile(z[:1], np.array([C]), tables)


def test_positive_quantile_is_uniform_without_drift() -> None:
    """The probability integral transform: u = F_ll(z) of data drawn from F_ll is uniform."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, C, (4, 40, 50))
    logits = rng.normal(0, 1, (4, C, 40, 50)) + 4 * np.eye(C)[labels].transpose(0, 3, 1, 2)
    pairs, counts = fit_pair_gmms(logits, labels, C, k=3)
    t = build_calibration_tables(pairs, counts, num_knots=32)
    z = np.take_along_axis(logits, labels[:, None], axis=1)[:, 0].reshape(-1)
    u = positive_quantile(z, labels.reshape(-1), t)
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    np.testing.assert_allclose(hist, 0.1, atol=0.02)


def test_classes_absent_from_the_labels_get_zero_shift_rows() -> None:
    """A source with fewer classes (SYNTHIA's 16 of 19): the pairs of a class never labelled have count 0
    and their rows of the shift tables are exactly 0, on the source and on the target side."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, C, (2, 20, 30))
    labels[labels == 2] = 0  # class 2 never labelled
    logits = rng.normal(0, 1, (2, C, 20, 30)) + 5 * np.eye(C)[labels].transpose(0, 3, 1, 2)
    pairs, counts = fit_pair_gmms(logits, labels, C, k=2)
    assert (counts[2] == 0).all() and (counts[[0, 1, 3, 4]] > 0).all()
    for built in (
        build_calibration_tables(pairs, counts, num_knots=32),
        build_calibration_tables(*_pairs(0), pairs, counts, num_knots=32),
    ):
        assert np.count_nonzero(built.shifts.delta[2]) == 0
        assert np.count_nonzero(built.shifts.delta[[0, 1, 3, 4]]) > 0
