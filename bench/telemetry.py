"""Cost of the live per-class monitoring per served request (service/telemetry.py, service/feedback.py).

    .venv/bin/python -m bench telemetry [--quick]

19 classes, calibration tables from random 3-component mixtures, random logits with their raw and
calibrated decisions; inputs at 4x the logits' resolution. For each logit shape: median wall time of the
pure per-request increments (``request_stats``), of the whole observer (increments + Prometheus metrics +
per-process totals), of storing the decisions for feedback and of a feedback's confusion counts at input
resolution; the stored bytes; and, for comparison, the core's exact quantiles that the tabulated ones
replace. The observers run after the response is sent, off the event loop. Random logits make noisy
masks: the stored bytes are an upper bound (smooth real masks compress several times better).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from bench._timing import timed
from calibration.alignment import calibrated_decision
from calibration.distributions import Gmm
from calibration.tables import CalibrationTables, anchor_quantile, build_calibration_tables, positive_quantile
from service.feedback import FeedbackStore, feedback_confusion, prediction_from_record
from service.records import SegmentationRecord, StageTimings
from service.telemetry import QuantileTables, Telemetry, request_stats, tabulate_quantiles

C = 19


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1000 * float(np.median(timed(fn, repeats, warmup=1)))


def measure(
    rng: np.random.Generator,
    tables: CalibrationTables,
    quantiles: QuantileTables,
    names: list[str],
    h: int,
    w: int,
) -> None:
    logits = rng.normal(0.0, 2.0, (C, h, w)).astype(np.float32)
    raw = logits.argmax(axis=0)
    record = SegmentationRecord(
        request_id="r",
        model_name="m",
        model_version="1",
        raw_decision=raw.astype(np.uint8),
        calibrated_decision=calibrated_decision(logits, tables.shifts, tau=0.2).astype(np.uint8),
        winning_logits=np.take_along_axis(logits, raw[None], axis=0)[0],
        logits=logits,
        tables=tables,
        input_size=(4 * h, 4 * w),
        calibrate=True,
        tau=0.2,
        timings=StageTimings(),
    )
    telemetry = Telemetry()
    telemetry.register_version("m", "1", names, tables)
    store = FeedbackStore()
    prediction = prediction_from_record(record, 0.0)
    truth = rng.integers(0, C, (4 * h, 4 * w)).astype(np.uint8)
    z, cls = record.winning_logits.ravel(), record.raw_decision.ravel()
    timings = [
        median_ms(lambda: request_stats(record, quantiles), 7),
        median_ms(lambda: telemetry.observe_segmentation(record), 7),
        median_ms(lambda: store.observe(record), 7),
        median_ms(lambda: feedback_confusion(prediction, truth), 7),
    ]
    exact = median_ms(lambda: (positive_quantile(z, cls, tables), anchor_quantile(z, tables)), 3)
    stats_ms, observe_ms, store_ms, feedback_ms = timings
    print(f"{h:>4}x{w:<4} {4 * h:>4}x{4 * w:<5} {stats_ms:>6.1f}ms {observe_ms:>6.1f}ms {store_ms:>5.1f}ms "
          f"{feedback_ms:>7.1f}ms {prediction.nbytes / 1024:>6.1f}KB {exact:>10.1f}ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench telemetry")
    parser.add_argument("--quick", action="store_true", help="only the 64x128 logits")
    args = parser.parse_args()
    shapes = [(64, 128)] if args.quick else [(64, 128), (128, 256)]
    rng = np.random.default_rng(0)
    means = rng.normal(-1.0, 0.8, (C, C, 3))
    means[np.arange(C), np.arange(C)] += rng.uniform(1.0, 4.0, (C, 1))
    gmm = Gmm(rng.dirichlet(np.ones(3), (C, C)), means, rng.uniform(0.4, 1.5, (C, C, 3)))
    tables = build_calibration_tables(gmm, rng.integers(100, 10_000, (C, C)))
    names = [f"class{i}" for i in range(C)]
    quantiles = tabulate_quantiles(tables)
    print(f"{'logits':>9} {'input':>10} {'stats':>8} {'observe':>8} {'store':>7} {'feedback':>9} "
          f"{'stored':>8} {'exact u+F_p':>12}")  # fmt: skip
    for h, w in shapes:
        measure(rng, tables, quantiles, names, h, w)


if __name__ == "__main__":
    main()
