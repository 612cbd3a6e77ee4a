"""Prometheus metrics of the service, and the per-class figures they are computed from.

Two halves:

- a pure core (:func:`pixel_weights`, :func:`bucket_counts`, :func:`request_stats`, :func:`bias_report`)
  that turns one :class:`~service.records.SegmentationRecord` into per-class increments with a few
  vectorised passes (``np.bincount``/``np.searchsorted``) at the decision size;
- :class:`Telemetry`, which only holds the ``prometheus_client`` objects and this process's running
  totals (for ``GET /v1/models/{name}/bias``) and adds the increments to them.

**Pixels are counted at the input resolution.** The decision is computed at the decision size (h, w),
on logits upsampled bilinearly (calibration.segmentation), and the served mask is its nearest-neighbour
resize to the uploaded image (H, W) (:func:`service.imaging.resize_nearest`). Each decision pixel
therefore stands for a fixed number of input pixels, ``rows[i] * cols[j]`` where
``rows = bincount(nearest_indices(h, H))``; every counter and every histogram observation is weighted by
it. The counts equal ``bincount`` of the served mask exactly, at the cost of the decision size (4 to 16
times fewer pixels than a large image at the default decision_scale).

**Everything aggregates by summing.** Only counters and histograms are per request; ratios (shares,
mean quantiles, IoU, Bias(l)) are left to PromQL recording rules (``deploy/prometheus/rules/``), so
that workers (multiprocess mode) and replicas add up exactly. Labels are bounded: model, version, class
name, decision (``raw``/``calibrated``), stage, route template; never request ids.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from calibration.bias import bias_from_confusion, iou_from_confusion
from calibration.distributions import Gmm, gmm_cdf
from calibration.tables import CalibrationTables
from service.feedback import FeedbackSettings, FeedbackStore
from service.imaging import nearest_indices
from service.records import SegmentationRecord
from service.worker_metrics import WorkerMetrics

if TYPE_CHECKING:
    from service.registry import ModelRegistry

# Fixed buckets: histograms only add up across processes when every process uses the same bounds.
QUANTILE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LOGIT_BUCKETS = (-5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 25.0, 30.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DECISIONS = ("raw", "calibrated")
STAGES = ("decode", "infer", "calibrate", "encode")
DOMAINS = ("source", "target")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# ---------------------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------------------


def pixel_weights(logit_shape: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(h, w) int64: input pixels each logit pixel becomes under the nearest resize to ``input_size``."""
    h, w = logit_shape
    height, width = input_size
    rows = np.bincount(nearest_indices(h, height), minlength=h)  # (h,)
    cols = np.bincount(nearest_indices(w, width), minlength=w)  # (w,)
    return np.outer(rows, cols).astype(np.int64)


def class_pixels(decision: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64 input pixels per class; decision and weights (h, w)."""
    counts = np.bincount(decision.ravel(), weights=weights.ravel(), minlength=num_classes)
    return np.rint(counts[:num_classes]).astype(np.int64)


def bucket_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(P,) values, (B,) increasing edges -> (P,) the index of the first edge >= value (B above all, and
    for nan): ``np.searchsorted(edges, values, side="left")``, by one comparison per edge. With a dozen
    edges that is ~7x faster than searchsorted's binary search on unordered values, which mispredicts
    its branches on every pixel; it is the largest share of the telemetry's per-request cost."""
    index = np.zeros(values.shape, np.uint8 if len(edges) < 255 else np.int64)
    for edge in edges:
        index += values > edge
    index[np.isnan(values)] = len(edges)
    return index


def bucket_counts(
    values: np.ndarray, classes: np.ndarray, weights: np.ndarray, bounds: Sequence[float], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted per-class histogram with Prometheus ``le`` semantics.

    values, classes, weights: (P,). Returns counts (C, B + 1) float64, *not* cumulative, the last column
    being the ``+Inf`` bucket (values above every bound), and the weighted sums of the values (C,).
    """
    edges = np.asarray(bounds, dtype=np.float64)
    slots = len(edges) + 1
    index = bucket_index(values, edges)  # (P,): first bound >= value, i.e. value <= le
    flat = classes.astype(np.int64) * slots + index
    counts = np.bincount(flat, weights=weights, minlength=num_classes * slots)[: num_classes * slots]
    sums = np.bincount(classes, weights=weights * values, minlength=num_classes)[:num_classes]
    return counts.reshape(num_classes, slots), sums


@dataclass(frozen=True)
class QuantileTables:
    """The CDFs of the quantile histograms, tabulated on uniform grids once per bundle version.

    ``calibration.tables.positive_quantile``/``anchor_quantile`` evaluate the mixtures per pixel: K normal
    CDFs for u and C·K for the anchor (≈ 10 and ≈ 90 ms for 128 x 256 logits at 19 classes, K = 3). On a
    uniform grid a lookup is index arithmetic and one linear interpolation (≈ 1 ms). The error is far
    below the histograms' 0.1-wide buckets: < 1e-5 for the test bundle, < 2e-4 with a component 400x
    narrower than the mixture's support (tested against the core's functions).
    """

    lo: np.ndarray  # (G,) first knot of each table: one per class for F_cc, then the anchor F_p
    step: np.ndarray  # (G,) knot spacing
    cdf: np.ndarray  # (G, N) CDF at the knots, non-decreasing, in [0, 1]


def _support(gmm: Gmm) -> tuple[np.ndarray, np.ndarray]:
    """(*B,) lower and upper ends of the mixtures (±9 standard deviations of the live components)."""
    live = gmm.weights > 0
    lo = np.min(np.where(live, gmm.means - 9.0 * gmm.stds, np.inf), axis=-1)
    hi = np.max(np.where(live, gmm.means + 9.0 * gmm.stds, -np.inf), axis=-1)
    empty = ~np.isfinite(lo)  # no live component (a class never seen): F = 0, as gmm_cdf gives
    return np.where(empty, 0.0, lo), np.where(empty, 1.0, hi)


def tabulate_quantiles(tables: CalibrationTables, num_knots: int = 8192) -> QuantileTables:
    c = tables.num_classes
    t = tables.target
    diag = np.arange(c)
    positive = Gmm(t.weights[diag, diag], t.means[diag, diag], t.stds[diag, diag])  # (C, K)
    lo_p, hi_p = _support(positive)  # (C,)
    lo_a, hi_a = _support(tables.anchor_pos)  # ()
    lo = np.append(lo_p, lo_a)  # (C + 1,)
    hi = np.append(hi_p, hi_a)
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, num_knots)  # (C + 1, N)
    cdf = np.concatenate([gmm_cdf(grid[:c], positive), gmm_cdf(grid[c], tables.anchor_pos)[None]])
    cdf = np.clip(np.maximum.accumulate(np.nan_to_num(cdf), axis=1), 0.0, 1.0)
    return QuantileTables(lo=lo, step=(hi - lo) / (num_knots - 1), cdf=cdf)


def _lookup(z: np.ndarray, table: np.ndarray, q: QuantileTables) -> np.ndarray:
    """z (P,) through table (P,) (the row of q per value) by linear interpolation; clamped at the ends."""
    n = q.cdf.shape[1]
    table = table.astype(np.int64, copy=False)  # uint8 class ids would overflow table * n
    position = np.clip((z - q.lo[table]) / q.step[table], 0.0, n - 1.0)  # (P,)
    left = np.minimum(position.astype(np.int64), n - 2)
    frac = position - left
    flat = q.cdf.reshape(-1)
    base = table * n + left
    return flat[base] + frac * (flat[base + 1] - flat[base])


def positive_quantiles(z: np.ndarray, cls: np.ndarray, q: QuantileTables) -> np.ndarray:
    """z (P,) logits of the decided classes cls (P,) -> u = F_cc(z) (P,) under the target positive pair."""
    return _lookup(z, cls, q)


def anchor_quantiles(z: np.ndarray, q: QuantileTables) -> np.ndarray:
    """z (P,) -> F_p(z) (P,) under the source positive anchor (the last table)."""
    return _lookup(z, np.full(z.shape, q.cdf.shape[0] - 1, dtype=np.int64), q)


@dataclass(frozen=True)
class DecisionStats:
    """Increments for one decision (raw or calibrated) of one request; pixels at input resolution."""

    pixels: np.ndarray  # (C,) int64
    logit_counts: np.ndarray  # (C, len(LOGIT_BUCKETS) + 1)
    logit_sums: np.ndarray  # (C,)
    # None when the bundle has no calibration tables (no distribution to take quantiles under).
    quantile_counts: np.ndarray | None  # (C, len(QUANTILE_BUCKETS) + 1): u = F_ll(z_l) under the target pair
    quantile_sums: np.ndarray | None  # (C,)
    anchor_counts: np.ndarray | None  # (C, len(QUANTILE_BUCKETS) + 1): F_p(z_l) under the source anchor
    anchor_sums: np.ndarray | None  # (C,)


@dataclass(frozen=True)
class RequestStats:
    num_classes: int
    raw: DecisionStats
    calibrated: DecisionStats | None  # None when calibration did not run
    # Pixels calibration changed, by their raw class (flipped[0]) and by their calibrated class (flipped[1]).
    flipped: np.ndarray | None  # (2, C) int64


def decision_stats(
    decision: np.ndarray,
    winning_logits: np.ndarray,
    weights: np.ndarray,
    num_classes: int,
    quantiles: QuantileTables | None,
) -> DecisionStats:
    """decision (h, w) int, winning_logits (h, w): the logit of the decided class, weights (h, w)."""
    cls = decision.ravel().astype(np.int64)  # (P,)
    z = winning_logits.ravel().astype(np.float64)  # (P,)
    wt = weights.ravel().astype(np.float64)  # (P,)
    logit_counts, logit_sums = bucket_counts(z, cls, wt, LOGIT_BUCKETS, num_classes)
    quantile_counts = quantile_sums = anchor_counts = anchor_sums = None
    if quantiles is not None:
        u = positive_quantiles(z, cls, quantiles)  # (P,)
        quantile_counts, quantile_sums = bucket_counts(u, cls, wt, QUANTILE_BUCKETS, num_classes)
        a = anchor_quantiles(z, quantiles)  # (P,)
        anchor_counts, anchor_sums = bucket_counts(a, cls, wt, QUANTILE_BUCKETS, num_classes)
    return DecisionStats(
        pixels=class_pixels(decision, weights, num_classes),
        logit_counts=logit_counts,
        logit_sums=logit_sums,
        quantile_counts=quantile_counts,
        quantile_sums=quantile_sums,
        anchor_counts=anchor_counts,
        anchor_sums=anchor_sums,
    )


def _combine(base: DecisionStats, minus: DecisionStats, plus: DecisionStats) -> DecisionStats:
    """base - minus + plus, field by field (None fields stay None)."""

    def f(a: np.ndarray | None, b: np.ndarray | None, c: np.ndarray | None) -> np.ndarray | None:
        return None if a is None or b is None or c is None else a - b + c

    return DecisionStats(
        pixels=base.pixels - minus.pixels + plus.pixels,
        logit_counts=base.logit_counts - minus.logit_counts + plus.logit_counts,
        logit_sums=base.logit_sums - minus.logit_sums + plus.logit_sums,
        quantile_counts=f(base.quantile_counts, minus.quantile_counts, plus.quantile_counts),
        quantile_sums=f(base.quantile_sums, minus.quantile_sums, plus.quantile_sums),
        anchor_counts=f(base.anchor_counts, minus.anchor_counts, plus.anchor_counts),
        anchor_sums=f(base.anchor_sums, minus.anchor_sums, plus.anchor_sums),
    )


def request_stats(record: SegmentationRecord, quantiles: QuantileTables | None) -> RequestStats:
    """All per-class increments of one served request; quantiles from ``record.tables`` (None: no histograms)."""
    logits = record.logits  # (C, h', w') the model's logits: the class count (and maybe the decision size)
    num_classes = logits.shape[0]
    weights = pixel_weights(record.raw_decision.shape, record.input_size)  # (h, w) at the decision size
    raw = decision_stats(record.raw_decision, record.winning_logits, weights, num_classes, quantiles)
    if record.calibrated_decision is None:
        return RequestStats(num_classes=num_classes, raw=raw, calibrated=None, flipped=None)
    cal = record.calibrated_decision
    changed = cal != record.raw_decision  # (h, w)
    cal_logits = record.calibrated_logits
    if cal_logits is None:
        cal_logits = np.take_along_axis(logits, cal[None].astype(np.intp), axis=0)[0]  # (h, w)
    # Calibration changes a few percent of the pixels and the others count exactly as in the raw stats:
    # calibrated = raw - (changed pixels as raw) + (changed pixels as calibrated), additive per pixel.
    # The per-pixel quantile look-ups and bucketing are the cost of telemetry at the decision size.
    w_changed = weights[changed]
    removed = decision_stats(
        record.raw_decision[changed], record.winning_logits[changed], w_changed, num_classes, quantiles
    )
    added = decision_stats(cal[changed], cal_logits[changed], w_changed, num_classes, quantiles)
    calibrated = _combine(raw, removed, added)
    flipped = np.stack([removed.pixels, added.pixels])
    return RequestStats(num_classes=num_classes, raw=raw, calibrated=calibrated, flipped=flipped)


def uniform_l1(counts: np.ndarray) -> np.ndarray:
    """Mean |F̂(b) − b| over the bucket bounds b of QUANTILE_BUCKETS: the drift size of a quantile histogram.

    counts (..., B + 1) non-cumulative -> (...,); nan where a histogram is empty. 0 for uniform
    quantiles, at most 0.9. The recording rule ``...:l1_from_uniform_...`` computes the same.
    """
    bounds = np.asarray(QUANTILE_BUCKETS)
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf = np.cumsum(counts, axis=-1)[..., : len(bounds)] / total  # (..., B)
    return np.abs(cdf - bounds).mean(axis=-1)


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with nan where den is 0 (an empty denominator has no ratio, not a zero one)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass
class BiasTotals:
    """Running totals of one model version in this process (what ``GET /v1/models/{name}/bias`` reports)."""

    class_names: tuple[str, ...]
    source_share: np.ndarray | None = None  # (C,) from the calibration tables
    target_share: np.ndarray | None = None  # (C,)
    images: int = 0
    calibrated_images: int = 0
    feedback_images: int = 0
    pixels: np.ndarray = field(init=False)  # (2, C) [raw, calibrated]
    calibration_input: np.ndarray = field(init=False)  # (C,) raw pixels of requests that ran calibration
    flipped: np.ndarray = field(init=False)  # (2, C) [by raw class, by calibrated class]
    quantile_counts: np.ndarray = field(init=False)  # (2, C, B + 1)
    quantile_sums: np.ndarray = field(init=False)  # (2, C)
    anchor_counts: np.ndarray = field(init=False)  # (2, C, B + 1)
    anchor_sums: np.ndarray = field(init=False)  # (2, C)
    confusion: np.ndarray = field(init=False)  # (2, C, C) [decision, true, predicted]

    def __post_init__(self) -> None:
        c, b = len(self.class_names), len(QUANTILE_BUCKETS) + 1
        self.pixels = np.zeros((2, c), np.int64)
        self.calibration_input = np.zeros(c, np.int64)
        self.flipped = np.zeros((2, c), np.int64)
        self.quantile_counts = np.zeros((2, c, b))
        self.quantile_sums = np.zeros((2, c))
        self.anchor_counts = np.zeros((2, c, b))
        self.anchor_sums = np.zeros((2, c))
        self.confusion = np.zeros((2, c, c), np.int64)


def add_request(totals: BiasTotals, stats: RequestStats) -> None:
    totals.images += 1
    sides = [(0, stats.raw)] if stats.calibrated is None else [(0, stats.raw), (1, stats.calibrated)]
    for d, side in sides:
        totals.pixels[d] += side.pixels
        if side.quantile_counts is not None and side.quantile_sums is not None:
            totals.quantile_counts[d] += side.quantile_counts
            totals.quantile_sums[d] += side.quantile_sums
        if side.anchor_counts is not None and side.anchor_sums is not None:
            totals.anchor_counts[d] += side.anchor_counts
            totals.anchor_sums[d] += side.anchor_sums
    if stats.flipped is not None:
        totals.calibrated_images += 1
        totals.calibration_input += stats.raw.pixels
        totals.flipped += stats.flipped


def class_shares(counts: np.ndarray) -> np.ndarray:
    """(..., C) -> (..., C) fractions of the last axis; nan where it sums to 0."""
    return safe_ratio(counts, counts.sum(axis=-1, keepdims=True))


def bias_report(totals: BiasTotals) -> dict[str, Any]:
    """The per-class figures of :class:`BiasTotals`, with the same definitions as the recording rules.

    Values are JSON-ready: nan becomes None (no data for that figure).
    """
    names = totals.class_names
    share = class_shares(totals.pixels)  # (2, C)
    mean_u = safe_ratio(totals.quantile_sums, totals.quantile_counts.sum(axis=-1))  # (2, C)
    mean_a = safe_ratio(totals.anchor_sums, totals.anchor_counts.sum(axis=-1))  # (2, C)
    drift = uniform_l1(totals.quantile_counts)  # (2, C)
    anchor_drift = uniform_l1(totals.anchor_counts)  # (2, C)
    flip_out = safe_ratio(totals.flipped[0], totals.calibration_input)  # (C,)
    flip_in = safe_ratio(totals.flipped[1], totals.pixels[1])  # (C,)
    has_feedback = totals.confusion.sum() > 0
    iou = [iou_from_confusion(totals.confusion[d]) for d in range(2)] if has_feedback else None
    bias = [bias_from_confusion(totals.confusion[d]) for d in range(2)] if has_feedback else None

    def num(x: float) -> float | None:
        return None if not np.isfinite(x) else float(x)

    classes = []
    for c, name in enumerate(names):
        entry: dict[str, Any] = {"class": name, "id": c}
        for d, decision in enumerate(DECISIONS):
            entry[decision] = {
                "pixels": int(totals.pixels[d, c]),
                "predicted_share": num(share[d, c]),
                "positive_quantile_mean_minus_half": num(mean_u[d, c] - 0.5),
                "positive_quantile_l1_from_uniform": num(drift[d, c]),
                "anchor_quantile_mean_minus_half": num(mean_a[d, c] - 0.5),
                "anchor_quantile_l1_from_uniform": num(anchor_drift[d, c]),
                "feedback_iou": num(iou[d][c]) if iou is not None else None,
                "feedback_bias": num(bias[d][c]) if bias is not None else None,
            }
        entry["flip_out_rate"] = num(flip_out[c])
        entry["flip_in_rate"] = num(flip_in[c])
        entry["source_share"] = num(totals.source_share[c]) if totals.source_share is not None else None
        entry["target_share"] = num(totals.target_share[c]) if totals.target_share is not None else None
        classes.append(entry)
    return {
        "images": totals.images,
        "calibrated_images": totals.calibrated_images,
        "feedback_images": totals.feedback_images,
        "flip_rate": num(float(safe_ratio(totals.flipped[0].sum(), totals.calibration_input.sum()))),
        "classes": classes,
    }


def table_shares(tables: CalibrationTables) -> tuple[np.ndarray, np.ndarray]:
    """(C,) class shares of the labelled source pixels and of the pseudo-labelled target pixels."""
    return class_shares(np.diag(tables.source_counts)), class_shares(np.diag(tables.target_counts))


# ---------------------------------------------------------------------------------------------------------
# Shell: the metric objects
# ---------------------------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus_client runs in multiprocess mode (set before import)."""
    return os.environ.get(MULTIPROC_ENV) or None


def add_histogram_counts(child: Any, counts: np.ndarray, total: float) -> None:
    """Add pre-bucketed observations to one histogram child: ``counts`` (B + 1,) non-cumulative.

    prometheus_client observes one value at a time; a request brings ~10^4 to 10^5 pixel values, so the
    buckets are incremented directly. Same result as ``observe`` per value (tested), including in
    multiprocess mode, where each bucket is a shared-memory value.
    """
    buckets = child._buckets  # list of values, one per bound, +Inf last
    if len(buckets) != len(counts):
        raise ValueError(f"expected {len(buckets)} bucket counts for this histogram, got {len(counts)}")
    for i in np.flatnonzero(counts):
        buckets[i].inc(float(counts[i]))
    child._sum.inc(float(total))


@dataclass
class _Children:
    """Label children of one model version, looked up once (``labels()`` costs a dict lookup and a lock)."""

    pixels: list[list[Any]]  # [decision][class]
    flipped: list[list[Any]]  # [decision][class]
    calibration_input: list[Any]  # [class]
    logit: list[list[Any]]
    quantile: list[list[Any]]
    anchor: list[list[Any]]
    stages: dict[str, Any]
    images: dict[bool, Any]
    feedback_images: Any
    confusion: list[list[list[Any]]]  # [decision][true][predicted]
    correct: list[list[Any]]  # [decision][class]


class Telemetry:
    """The service's metrics, registered in ``registry``, and this process's per-version totals.

    One per app (created in the lifespan). In multiprocess mode the values live in the shared directory
    and ``GET /metrics`` reads them all; ``registry`` then only serves single-process scrapes and tests.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        class_names_of: Callable[[str, str], Sequence[str] | None] | None = None,
    ) -> None:
        # (model, version) -> class names, for versions first seen in a request (a reload after start).
        self._class_names_of = class_names_of
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        version_labels = ["model", "version"]
        class_labels = ["model", "version", "class", "decision"]
        self.http_requests = Counter(
            "blda_http_requests", "HTTP requests answered, by route template and status code.",
            ["route", "method", "status"], registry=reg,
        )  # fmt: skip
        self.http_duration = Histogram(
            "blda_http_request_duration_seconds", "Time from request to response, by route template.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.in_flight = Gauge(
            "blda_http_requests_in_flight", "Requests being handled now (summed over live workers).",
            multiprocess_mode="livesum", registry=reg,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "blda_stage_duration_seconds",
            "Seconds per segmentation stage (decode, infer, calibrate, encode).",
            ["model", "version", "stage"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.images = Counter(
            "blda_segmented_images", "Images segmented, by whether calibration ran.",
            ["model", "version", "calibrated"], registry=reg,
        )  # fmt: skip
        self.calibrator_images = Counter(
            "blda_calibrator_images",
            "Images segmented, by the calibrator of the served decision "
            "(bounded: the bundle's calibrators; none is the raw argmax).",
            ["model", "version", "calibrator"],
            registry=reg,
        )
        self.model_info = Gauge(
            "blda_model_info", "1 for each model version loaded by a live worker process.",
            ["model", "version", "calibration"], multiprocess_mode="livemax", registry=reg,
        )  # fmt: skip
        self.table_share = Gauge(
            "blda_calibration_class_share",
            "Class share of the pixels the calibration tables were fitted on "
            "(source: labels, target: pseudo-labels).",
            ["model", "version", "class", "domain"], multiprocess_mode="livemax", registry=reg,
        )  # fmt: skip
        self.pixels = Counter(
            "blda_predicted_pixels",
            "Input-resolution pixels predicted as the class, by decision (raw or calibrated).",
            class_labels, registry=reg,
        )  # fmt: skip
        self.calibration_input = Counter(
            "blda_calibration_input_pixels",
            "Pixels of requests that ran calibration, by their raw class (denominator of the flip-out rate).",
            ["model", "version", "class"], registry=reg,
        )  # fmt: skip
        self.flipped = Counter(
            "blda_calibration_flipped_pixels",
            "Pixels whose class calibration changed, by their raw class (decision=raw) "
            "or their new class (decision=calibrated).",
            class_labels, registry=reg,
        )  # fmt: skip
        self.logit = Histogram(
            "blda_winning_logit", "Logit of the decided class per input pixel.",
            class_labels, buckets=LOGIT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.quantile = Histogram(
            "blda_positive_quantile",
            "u = F_ll(z_l): quantile of the decided class's logit under the bundle's target positive "
            "distribution of that class; uniform without drift.",
            class_labels, buckets=QUANTILE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.anchor = Histogram(
            "blda_anchor_quantile",
            "F_p(z_l): quantile of the decided class's logit under the source positive anchor "
            "(label-free bias).",
            class_labels, buckets=QUANTILE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.feedback_images = Counter(
            "blda_feedback_images", "Ground-truth masks accepted by POST /v1/feedback.",
            version_labels, registry=reg,
        )  # fmt: skip
        self.confusion = Counter(
            "blda_feedback_confusion_pixels",
            "Feedback pixels by true class (true_class) and predicted class (class), at input resolution.",
            ["model", "version", "decision", "true_class", "class"], registry=reg,
        )  # fmt: skip
        self.correct = Counter(
            "blda_feedback_correct_pixels",
            "Feedback pixels predicted as their true class "
            "(the confusion diagonal, which PromQL cannot select).",
            class_labels, registry=reg,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._children: dict[tuple[str, str], _Children] = {}
        self._quantiles: dict[tuple[str, str], QuantileTables] = {}
        self.totals: dict[tuple[str, str], BiasTotals] = {}

    # -- bundles ---------------------------------------------------------------------------------------

    def register_version(
        self,
        model: str,
        version: str,
        class_names: Sequence[str],
        tables: CalibrationTables | None,
        calibrators: Sequence[str] = (),
    ) -> None:
        """Create every series of a model version at 0 (idempotent).

        Series that exist before the first request make ``rate()``/``increase()`` count the first
        increments too, and keep dashboards from showing "no data" for classes never predicted.
        """
        key = (model, version)
        with self._lock:
            if key in self._children:
                return
            names = tuple(class_names)
            children = self._make_children(model, version, names)
            totals = BiasTotals(class_names=names)
            self.model_info.labels(model, version, str(tables is not None).lower()).set(1)
            for name in calibrators:
                self.calibrator_images.labels(model, version, name)
            if tables is not None:
                self._quantiles[key] = tabulate_quantiles(tables)
                totals.source_share, totals.target_share = table_shares(tables)
                for domain, shares in zip(DOMAINS, (totals.source_share, totals.target_share), strict=True):
                    for name, share in zip(names, shares, strict=True):
                        self.table_share.labels(model, version, name, domain).set(float(np.nan_to_num(share)))
            self.totals[key] = totals
            self._children[key] = children  # last: its presence means the version is complete

    def has_version(self, model: str, version: str) -> bool:
        return (model, version) in self._children

    def _make_children(self, model: str, version: str, names: tuple[str, ...]) -> _Children:
        def per_class(metric: Any) -> list[list[Any]]:
            return [[metric.labels(model, version, n, d) for n in names] for d in DECISIONS]

        return _Children(
            pixels=per_class(self.pixels),
            flipped=per_class(self.flipped),
            calibration_input=[self.calibration_input.labels(model, version, n) for n in names],
            logit=per_class(self.logit),
            quantile=per_class(self.quantile),
            anchor=per_class(self.anchor),
            stages={s: self.stage_duration.labels(model, version, s) for s in STAGES},
            images={flag: self.images.labels(model, version, str(flag).lower()) for flag in (False, True)},
            feedback_images=self.feedback_images.labels(model, version),
            confusion=[
                [[self.confusion.labels(model, version, d, t, p) for p in names] for t in names]
                for d in DECISIONS
            ],
            correct=per_class(self.correct),
        )

    # -- observers -------------------------------------------------------------------------------------

    def observe_segmentation(self, record: SegmentationRecord) -> None:
        """A segmentation observer (``app.state.segmentation_observers``): runs after the response is sent."""
        names = self._class_names(record)
        self.register_version(record.model_name, record.model_version, names, record.tables)
        key = (record.model_name, record.model_version)
        stats = request_stats(record, self._quantiles[key] if record.tables is not None else None)
        children = self._children[key]
        timings = record.timings
        for stage in STAGES:
            if stage == "calibrate" and not record.calibrate:
                continue
            children.stages[stage].observe(getattr(timings, stage))
        children.images[stats.calibrated is not None].inc()
        # Bounded: the route only serves the bundle's calibrators (service.pipeline.choose_calibrator).
        self.calibrator_images.labels(record.model_name, record.model_version, record.calibrator_name).inc()
        sides = [(0, stats.raw)] if stats.calibrated is None else [(0, stats.raw), (1, stats.calibrated)]
        for d, side in sides:
            for c in np.flatnonzero(side.pixels):
                children.pixels[d][c].inc(int(side.pixels[c]))
                add_histogram_counts(children.logit[d][c], side.logit_counts[c], side.logit_sums[c])
                if side.quantile_counts is not None and side.quantile_sums is not None:
                    add_histogram_counts(
                        children.quantile[d][c], side.quantile_counts[c], side.quantile_sums[c]
                    )
                if side.anchor_counts is not None and side.anchor_sums is not None:
                    add_histogram_counts(children.anchor[d][c], side.anchor_counts[c], side.anchor_sums[c])
        if stats.flipped is not None:
            for c in np.flatnonzero(stats.raw.pixels):
                children.calibration_input[c].inc(int(stats.raw.pixels[c]))
            for d in range(2):
                for c in np.flatnonzero(stats.flipped[d]):
                    children.flipped[d][c].inc(int(stats.flipped[d, c]))
        with self._lock:
            add_request(self.totals[key], stats)

    def observe_feedback(self, model: str, version: str, confusion: np.ndarray) -> None:
        """Add one ground-truth mask's confusion counts (2, C, C) [decision, true, predicted]."""
        if not self.has_version(model, version):  # only when the segmentation observer failed for it
            lookup = self._class_names_of
            names = (lookup(model, version) if lookup is not None else None) or [
                str(c) for c in range(len(confusion[0]))
            ]
            self.register_version(model, version, names, None)
        children = self._children[(model, version)]
        children.feedback_images.inc()
        for d, t, p in zip(*np.nonzero(confusion), strict=True):
            children.confusion[d][t][p].inc(int(confusion[d, t, p]))
            if t == p:
                children.correct[d][p].inc(int(confusion[d, t, p]))
        with self._lock:
            totals = self.totals[(model, version)]
            totals.feedback_images += 1
            totals.confusion += confusion

    def _class_names(self, record: SegmentationRecord) -> tuple[str, ...]:
        lookup = self._class_names_of
        names = lookup(record.model_name, record.model_version) if lookup is not None else None
        if names:
            return tuple(names)
        return tuple(str(c) for c in range(record.logits.shape[0]))

    def report(self, model: str) -> dict[str, Any]:
        """``{version: bias_report}`` for the versions of ``model`` this process has seen."""
        with self._lock:
            return {v: bias_report(t) for (m, v), t in sorted(self.totals.items()) if m == model}


# ---------------------------------------------------------------------------------------------------------
# HTTP metrics: a pure ASGI middleware (BaseHTTPMiddleware would buffer streamed bodies)
# ---------------------------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[[Scope, Receive, Callable[[Message], Awaitable[None]]], Awaitable[None]]


class HttpMetricsMiddleware:
    """Counts requests by route *template* (``/v1/models/{name}/segment``), never by raw path.

    Reads ``app.state.telemetry`` per request, so it can be installed in ``create_app`` before the
    lifespan has created the telemetry; requests before that (or without it) are not counted.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        telemetry = _telemetry_of(scope) if scope["type"] == "http" else None
        if telemetry is None:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        # No route label: the route is only known once the router has matched.
        in_flight = telemetry.in_flight
        in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            telemetry.http_requests.labels(route, method, str(status)).inc()
            telemetry.http_duration.labels(route, method).observe(time.perf_counter() - start)


def _telemetry_of(scope: Scope) -> Telemetry | None:
    app = scope.get("app")
    state = getattr(app, "state", None)
    telemetry = getattr(state, "telemetry", None)
    return telemetry if isinstance(telemetry, Telemetry) else None


# ---------------------------------------------------------------------------------------------------------
# Wiring (called from the app's lifespan)
# ---------------------------------------------------------------------------------------------------------


def _names_from_registry(registry: ModelRegistry, model: str, version: str) -> list[str] | None:
    try:
        state = registry.get(model).versions.get(version)
    except Exception:  # the registry's own errors: an unknown model has no names to give
        return None
    if state is None or state.model is None:
        return None
    return state.model.bundle.manifest.class_names


def register_loaded_versions(telemetry: Telemetry, registry: ModelRegistry) -> None:
    """Create the series of every loaded version not seen yet (at start, and at each scrape after a reload).

    A version first seen in a request would appear in Prometheus with its first increments already
    in, which ``rate()`` cannot count; created at a scrape, it appears at 0.
    """
    for state in registry.models():
        for version in state.versions.values():
            if version.model is not None and not telemetry.has_version(state.name, version.version):
                bundle = version.model.bundle
                names = bundle.manifest.class_names
                telemetry.register_version(
                    state.name, version.version, names, bundle.tables, list(bundle.calibrators)
                )


def start_monitoring(app: Any, registry: ModelRegistry) -> None:
    """Create the telemetry and the feedback store on ``app.state`` and register their observers; start
    this worker's process and version-status sampler (:mod:`service.worker_metrics`).

    Every loaded version's series are created at 0 here, before the first scrape.
    """
    telemetry = Telemetry(class_names_of=partial(_names_from_registry, registry))
    register_loaded_versions(telemetry, registry)
    settings = FeedbackSettings()
    # The shared state when the service has one (several workers or replicas), else its own memory.
    shared = getattr(app.state, "shared_state", None)
    store = FeedbackStore(max_entries=settings.max_entries, ttl_s=settings.ttl_s, state=shared)
    app.state.telemetry = telemetry
    app.state.feedback_store = store
    # Not an observer: the segment route stores the prediction before the response is sent.
    app.state.segmentation_observers.append(telemetry.observe_segmentation)
    workers = WorkerMetrics(telemetry.registry)
    workers.start(registry)
    app.state.worker_metrics = workers


def stop_monitoring(app: Any) -> None:
    """Unhook the observers; in multiprocess mode, drop this worker's live gauges (in-flight, model info)."""
    telemetry = getattr(app.state, "telemetry", None)
    store = getattr(app.state, "feedback_store", None)
    observers = app.state.segmentation_observers
    for hook in (getattr(telemetry, "observe_segmentation", None), getattr(store, "observe", None)):
        if hook in observers:
            observers.remove(hook)
    app.state.telemetry = None
    app.state.feedback_store = None
    workers = getattr(app.state, "worker_metrics", None)
    if workers is not None:
        workers.stop()
        app.state.worker_metrics = None
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid())
