"""The telemetry core: per-request increments against slow per-pixel references, and the metric objects."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monitoring_helpers import CLASS_NAMES, fitted_tables, model_weights, random_record
from prometheus_client import CollectorRegistry, Histogram

from calibration.bias import bias_from_confusion, iou_from_confusion
from calibration.distributions import Gmm
from calibration.tables import CalibrationTables, anchor_quantile, build_calibration_tables, positive_quantile
from service.imaging import resize_nearest
from service.telemetry import (
    LOGIT_BUCKETS,
    QUANTILE_BUCKETS,
    BiasTotals,
    Telemetry,
    add_histogram_counts,
    add_request,
    anchor_quantiles,
    bias_report,
    bucket_counts,
    bucket_index,
    class_pixels,
    pixel_weights,
    positive_quantiles,
    request_stats,
    tabulate_quantiles,
    uniform_l1,
)

C = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def tables() -> CalibrationTables:
    return fitted_tables(*model_weights())


def slow_bucket(value: float, bounds: tuple[float, ...]) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_pixel_weights_count_the_served_mask(h: int, w: int, height: int, width: int, seed: int) -> None:
    decision = np.random.default_rng(seed).integers(0, C, (h, w))
    weights = pixel_weights((h, w), (height, width))
    served = resize_nearest(decision, height, width)  # what the client gets
    assert weights.sum() == height * width
    np.testing.assert_array_equal(
        class_pixels(decision, weights, C), np.bincount(served.ravel(), minlength=C)
    )


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.sampled_from([-1.0, 0.0, 0.1, 0.15, 0.2, 0.5, 0.99, 1.0, 2.0]) | st.floats(-3, 3), min_size=0,
                    max_size=60),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_bucket_counts_match_a_loop_with_le_semantics(values: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=np.float64)
    cls = rng.integers(0, C, v.size)
    wt = rng.integers(1, 5, v.size).astype(np.float64)
    counts, sums = bucket_counts(v, cls, wt, QUANTILE_BUCKETS, C)
    expected = np.zeros((C, len(QUANTILE_BUCKETS) + 1))
    expected_sums = np.zeros(C)
    for value, c, weight in zip(v, cls, wt, strict=True):
        expected[c, slow_bucket(value, QUANTILE_BUCKETS)] += weight
        expected_sums[c] += weight * value
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(sums, expected_sums, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([*LOGIT_BUCKETS, *QUANTILE_BUCKETS, float("nan"), float("inf"), -float("inf")])
                    | st.floats(-40, 40), min_size=0, max_size=80),
    logit=st.booleans(),
)  # fmt: skip
def test_bucket_index_is_searchsorted_left(values: list[float], logit: bool) -> None:
    edges = np.asarray(LOGIT_BUCKETS if logit else QUANTILE_BUCKETS, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    np.testing.assert_array_equal(bucket_index(v, edges), np.searchsorted(edges, v, side="left"))


@pytest.mark.parametrize("input_size", [(28, 36), (30, 41), (5, 3)])
@pytest.mark.parametrize("calibrate", [True, False])
def test_request_stats_match_a_per_pixel_reference_at_input_resolution(
    tables: CalibrationTables, input_size: tuple[int, int], calibrate: bool
) -> None:
    record = random_record(tables, seed=sum(input_size), input_size=input_size, calibrate=calibrate)
    quantiles = tabulate_quantiles(tables)
    stats = request_stats(record, quantiles)
    height, width = input_size
    # Reference: resize everything to the input, then count pixel by pixel.
    raw_up = resize_nearest(record.raw_decision, height, width).ravel()
    decisions = [raw_up]
    if calibrate:
        assert record.calibrated_decision is not None
        decisions.append(resize_nearest(record.calibrated_decision, height, width).ravel())
    logits_up = np.stack([resize_nearest(record.logits[c], height, width) for c in range(C)]).reshape(C, -1)
    sides = [stats.raw] if not calibrate else [stats.raw, stats.calibrated]
    for decision, side in zip(decisions, sides, strict=True):
        assert side is not None
        z = logits_up[decision, np.arange(decision.size)]
        u = positive_quantiles(z, decision, quantiles)
        a = anchor_quantiles(z, quantiles)
        pixels = np.zeros(C, np.int64)
        logit_counts = np.zeros((C, len(LOGIT_BUCKETS) + 1))
        u_counts = np.zeros((C, len(QUANTILE_BUCKETS) + 1))
        a_counts = np.zeros((C, len(QUANTILE_BUCKETS) + 1))
        u_sums = np.zeros(C)
        for p in range(decision.size):
            c = decision[p]
            pixels[c] += 1
            logit_counts[c, slow_bucket(z[p], LOGIT_BUCKETS)] += 1
            u_counts[c, slow_bucket(u[p], QUANTILE_BUCKETS)] += 1
            a_counts[c, slow_bucket(a[p], QUANTILE_BUCKETS)] += 1
            u_sums[c] += u[p]
        np.testing.assert_array_equal(side.pixels, pixels)
        np.testing.assert_array_equal(side.logit_counts, logit_counts)
        np.testing.assert_array_equal(side.quantile_counts, u_counts)
        np.testing.assert_array_equal(side.anchor_counts, a_counts)
        np.testing.assert_allclose(side.quantile_sums, u_sums, rtol=1e-10)
    if calibrate:
        assert stats.flipped is not None
        changed = decisions[0] != decisions[1]
        np.testing.assert_array_equal(stats.flipped[0], np.bincount(decisions[0][changed], minlength=C))
        np.testing.assert_array_equal(stats.flipped[1], np.bincount(decisions[1][changed], minlength=C))
        assert stats.flipped.sum() > 0, "the fixture should make calibration flip some pixels"
    else:
        assert stats.calibrated is None and stats.flipped is None


def wide_tables() -> CalibrationTables:
    """19 classes, 3 components each, one of them narrow: the hard case for a uniform grid."""
    rng = np.random.default_rng(5)
    c = 19
    means = rng.normal(-1.0, 2.0, (c, c, 3))
    stds = rng.uniform(0.3, 2.0, (c, c, 3))
    stds[:, :, 0] = 0.05
    counts = rng.integers(100, 10_000, (c, c))
    counts[4, :] = 0  # a class never seen
    return build_calibration_tables(Gmm(rng.dirichlet(np.ones(3), (c, c)), means, stds), counts, num_knots=64)


@pytest.mark.parametrize("which", ["fitted", "wide"])
def test_tabulated_quantiles_match_the_core(tables: CalibrationTables, which: str) -> None:
    t = tables if which == "fitted" else wide_tables()
    q = tabulate_quantiles(t)
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0.0, 6.0, 100_000), [-1e6, 1e6, 0.0]])
    cls = rng.integers(0, t.num_classes, z.size)
    u = positive_quantiles(z, cls, q)
    a = anchor_quantiles(z, q)
    atol = 1e-5 if which == "fitted" else 2e-4
    np.testing.assert_allclose(u, positive_quantile(z, cls, t), atol=atol)
    np.testing.assert_allclose(a, anchor_quantile(z, t), atol=atol)
    assert u.min() >= 0.0 and u.max() <= 1.0 and a.min() >= 0.0 and a.max() <= 1.0


def test_no_tables_means_no_quantiles() -> None:
    stats = request_stats(random_record(None, seed=1, calibrate=False), None)
    assert stats.raw.quantile_counts is None and stats.raw.anchor_counts is None
    assert stats.raw.pixels.sum() == 30 * 41


def test_uniform_l1_is_mean_gap_between_bucket_cdf_and_diagonal() -> None:
    uniform = np.ones(len(QUANTILE_BUCKETS) + 1)
    uniform[-1] = 0  # nothing above 1
    assert uniform_l1(uniform) == pytest.approx(0.0)
    all_low = np.zeros(len(QUANTILE_BUCKETS) + 1)
    all_low[0] = 7  # every u <= 0.1: CDF = 1 everywhere
    assert uniform_l1(all_low) == pytest.approx(np.mean(1 - np.asarray(QUANTILE_BUCKETS)))
    assert np.isnan(uniform_l1(np.zeros(len(QUANTILE_BUCKETS) + 1)))
    samples = np.random.default_rng(0).uniform(0, 1, 100_000)
    counts, _ = bucket_counts(
        samples, np.zeros(samples.size, np.int64), np.ones(samples.size), QUANTILE_BUCKETS, 1
    )
    assert uniform_l1(counts[0]) < 0.01


def test_bias_report_uses_the_core_measures(tables: CalibrationTables) -> None:
    totals = BiasTotals(class_names=CLASS_NAMES)
    quantiles = tabulate_quantiles(tables)
    for seed in range(3):
        add_request(totals, request_stats(random_record(tables, seed), quantiles))
    add_request(totals, request_stats(random_record(tables, 9, calibrate=False), quantiles))
    rng = np.random.default_rng(0)
    totals.confusion += rng.integers(0, 50, totals.confusion.shape)
    totals.confusion[:, 2, :] = 0  # a class absent from the ground truth
    report = bias_report(totals)
    assert report["images"] == 4 and report["calibrated_images"] == 3
    for d, decision in enumerate(("raw", "calibrated")):
        iou = iou_from_confusion(totals.confusion[d])
        bias = bias_from_confusion(totals.confusion[d])
        shares = totals.pixels[d] / totals.pixels[d].sum()
        for c, entry in enumerate(report["classes"]):
            assert entry["class"] == CLASS_NAMES[c]
            assert entry[decision]["feedback_iou"] == pytest.approx(iou[c])
            assert entry[decision]["feedback_bias"] == pytest.approx(bias[c])
            assert entry[decision]["predicted_share"] == pytest.approx(shares[c])
            n = totals.quantile_counts[d, c].sum()
            expected_u = totals.quantile_sums[d, c] / n - 0.5 if n else None
            assert entry[decision]["positive_quantile_mean_minus_half"] == pytest.approx(expected_u)
    assert report["flip_rate"] == pytest.approx(totals.flipped[0].sum() / totals.calibration_input.sum())
    # 4 images of 30 x 41 pixels, 3 of them calibrated.
    assert totals.pixels[0].sum() == 4 * 30 * 41 and totals.pixels[1].sum() == 3 * 30 * 41


def test_bulk_histogram_increments_equal_observing_each_value() -> None:
    rng = np.random.default_rng(1)
    values = np.round(rng.uniform(-0.2, 1.3, 500), 1)  # many values exactly on a bound
    bulk_registry, loop_registry = CollectorRegistry(), CollectorRegistry()
    bulk = Histogram("h", "h", buckets=QUANTILE_BUCKETS, registry=bulk_registry)
    loop = Histogram("h", "h", buckets=QUANTILE_BUCKETS, registry=loop_registry)
    counts, sums = bucket_counts(
        values, np.zeros(values.size, np.int64), np.ones(values.size), QUANTILE_BUCKETS, 1
    )
    add_histogram_counts(bulk, counts[0], sums[0])
    for value in values:
        loop.observe(value)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for m in registry.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        }

    got, expected = samples(bulk_registry), samples(loop_registry)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_add_histogram_counts_checks_the_bucket_count() -> None:
    histogram = Histogram("h", "h", buckets=QUANTILE_BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected 11 bucket counts"):
        add_histogram_counts(histogram, np.ones(5), 1.0)


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_telemetry_exports_the_request_increments(tables: CalibrationTables) -> None:
    telemetry = Telemetry()
    telemetry.register_version("m", "1", CLASS_NAMES, tables)
    reg = telemetry.registry
    # Every series exists at 0 before the first request.
    assert sample_value(reg, "blda_predicted_pixels_total", model="m", version="1", **{"class": "sky"},
                        decision="calibrated") == 0  # fmt: skip
    records = [random_record(tables, s) for s in range(3)] + [random_record(tables, 5, calibrate=False)]
    totals = BiasTotals(class_names=CLASS_NAMES)
    for record in records:
        telemetry.observe_segmentation(record)
        add_request(totals, request_stats(record, tabulate_quantiles(tables)))
    for d, decision in enumerate(("raw", "calibrated")):
        for c, name in enumerate(CLASS_NAMES):
            labels = {"model": "m", "version": "1", "class": name, "decision": decision}
            assert sample_value(reg, "blda_predicted_pixels_total", **labels) == totals.pixels[d, c]
            assert sample_value(reg, "blda_positive_quantile_count", **labels) == totals.pixels[d, c]
            assert sample_value(reg, "blda_positive_quantile_sum", **labels) == pytest.approx(
                totals.quantile_sums[d, c]
            )
            cumulative = np.cumsum(totals.anchor_counts[d, c])
            for i, bound in enumerate(QUANTILE_BUCKETS):
                got = sample_value(reg, "blda_anchor_quantile_bucket", le=str(bound), **labels)
                assert got == cumulative[i]
            assert (
                sample_value(reg, "blda_calibration_flipped_pixels_total", **labels) == totals.flipped[d, c]
            )
    assert sample_value(reg, "blda_segmented_images_total", model="m", version="1", calibrated="true") == 3
    assert sample_value(reg, "blda_segmented_images_total", model="m", version="1", calibrated="false") == 1
    assert sample_value(reg, "blda_stage_duration_seconds_count", model="m", version="1", stage="infer") == 4
    assert (
        sample_value(reg, "blda_stage_duration_seconds_count", model="m", version="1", stage="calibrate") == 3
    )
    assert sample_value(reg, "blda_model_info", model="m", version="1", calibration="true") == 1
    source_share = np.diag(tables.source_counts) / np.diag(tables.source_counts).sum()
    assert sample_value(
        reg,
        "blda_calibration_class_share",
        model="m",
        version="1",
        domain="source",
        **{"class": CLASS_NAMES[0]},
    ) == pytest.approx(source_share[0])

    confusion = np.random.default_rng(0).integers(0, 9, (2, C, C))
    telemetry.observe_feedback("m", "1", confusion)
    for d, decision in enumerate(("raw", "calibrated")):
        for t, true_name in enumerate(CLASS_NAMES):
            for p, name in enumerate(CLASS_NAMES):
                got = sample_value(
                    reg, "blda_feedback_confusion_pixels_total", model="m", version="1", decision=decision,
                    true_class=true_name, **{"class": name},
                )  # fmt: skip
                assert got == confusion[d, t, p]
            correct = sample_value(
                reg, "blda_feedback_correct_pixels_total", model="m", version="1", decision=decision,
                **{"class": true_name},
            )  # fmt: skip
            assert correct == confusion[d, t, t]
    report = telemetry.report("m")["1"]
    assert report["feedback_images"] == 1
    assert report["classes"][0]["raw"]["feedback_iou"] == pytest.approx(iou_from_confusion(confusion[0])[0])


def test_versions_first_seen_in_a_request_get_names_from_the_lookup(tables: CalibrationTables) -> None:
    telemetry = Telemetry(class_names_of=lambda model, version: CLASS_NAMES if model == "m" else None)
    telemetry.observe_segmentation(random_record(tables, 0))
    labels = {"model": "m", "version": "1", "class": "traffic light", "decision": "raw"}
    assert telemetry.registry.get_sample_value("blda_predicted_pixels_total", labels) is not None


def test_feedback_for_a_version_never_registered_still_counts() -> None:
    telemetry = Telemetry(class_names_of=lambda model, version: CLASS_NAMES)
    confusion = np.zeros((2, C, C), np.int64)
    confusion[0, 1, 2] = 5
    telemetry.observe_feedback("m", "7", confusion)
    labels = {
        "model": "m",
        "version": "7",
        "decision": "raw",
        "true_class": CLASS_NAMES[1],
        "class": CLASS_NAMES[2],
    }
    assert telemetry.registry.get_sample_value("blda_feedback_confusion_pixels_total", labels) == 5
