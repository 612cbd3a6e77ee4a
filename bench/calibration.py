"""Speed and memory of the calibrated decision rule (DESIGN.md §2).

    .venv/bin/python -m bench calibration [--quick]

Tables are fitted on synthetic class-biased logits (19 classes, mixtures of confident and ambiguous
pixels); the "realistic" logits are drawn from the same model (most pixels confident), the "noise" logits
are pure N(0, 1), the hard case where almost no pixel is decided by the bound. For each shape and case:
median wall and CPU time over a few repeats, peak extra memory (tracemalloc; the input logits are not counted), the
fraction of pixels that the exact bound decides alone, hypotheses evaluated per pixel, and the agreement
of the top-k variants with the exact rule.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from functools import partial

import numpy as np

from calibration.alignment import (
    ShiftTables,
    calibrated_decision,
    calibrated_decision_topk,
    candidate_counts,
    raw_decision,
)
from calibration.distributions import fit_pair_gmms
from calibration.tables import build_calibration_tables

C = 19
TAU = 0.2


def synthetic_logits(
    rng: np.random.Generator, n: int, h: int, w: int, offset: np.ndarray, blocks: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) float32 class-biased logits and their (N, H, W) labels: blocky scenes, 70% of the
    pixels confident (positive logit ~ N(5, 1.2)), the rest ambiguous (~ N(1.5, 1))."""
    labels = np.empty((n, h, w), dtype=np.int64)
    for i in range(n):
        small = rng.integers(0, C, (blocks, blocks * 2))
        labels[i] = np.kron(small, np.ones((-(-h // blocks), -(-w // (blocks * 2))), dtype=np.int64))[:h, :w]
    z = rng.normal(-1.0, 1.2, (n, C, h, w)).astype(np.float32)
    z += offset.astype(np.float32)[None, :, None, None]
    confident = rng.random((n, h, w)) < 0.7
    pos = np.where(confident, rng.normal(5.0, 1.2, (n, h, w)), rng.normal(1.5, 1.0, (n, h, w)))
    np.put_along_axis(z, labels[:, None], (pos + offset[labels]).astype(np.float32)[:, None], axis=1)
    return z, labels


def fitted_tables(rng: np.random.Generator) -> ShiftTables:
    """Source pairs with mild offsets, target pairs (pseudo-labels) with a stronger class bias."""
    src_off = rng.normal(0, 0.3, C)
    tgt_off = src_off + rng.normal(0, 1.0, C)
    zs, ys = synthetic_logits(rng, 4, 64, 128, src_off)
    zt, _ = synthetic_logits(rng, 4, 64, 128, tgt_off)
    source, sc = fit_pair_gmms(zs, ys, C, k=5, max_samples=5000)
    target, tc = fit_pair_gmms(zt, zt.argmax(1), C, k=5, max_samples=5000)
    return build_calibration_tables(source, sc, target, tc).shifts


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds. On a shared machine the CPU time is the steadier figure."""
    wall, cpu = [], []
    fn()  # warm-up
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def peak_mb(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="only the 128x256 shape")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tables = fitted_tables(rng)
    d = float(np.abs(tables.delta).max())
    print(f"tables: C={C}, M={tables.delta.shape[2]}, max|Δ|={d:.2f}, tau={TAU}")
    shapes = [(128, 256)] if args.quick else [(128, 256), (512, 1024)]
    header = f"{'shape':>9} {'case':>9} {'method':>15} {'wall ms':>8} {'cpu ms':>8} {'peak MB':>8} {'agree':>8}  notes"
    print(header)
    print("-" * len(header))
    for h, w in shapes:
        repeats = 7 if h * w <= 1 << 15 else 3
        real, _ = synthetic_logits(rng, 1, h, w, rng.normal(0, 1.0, C))
        cases = {"realistic": real[0], "noise": rng.normal(0, 1, (C, h, w)).astype(np.float32)}
        for case, z in cases.items():
            exact = calibrated_decision(z, tables, tau=TAU)
            counts = candidate_counts(z, tables, tau=TAU)
            skipped = float(np.mean(counts == 1))
            methods: dict[str, Callable[[], np.ndarray]] = {
                "raw argmax": partial(raw_decision, z),
                "exact": partial(calibrated_decision, z, tables, tau=TAU),
                "top-2": partial(calibrated_decision_topk, z, tables, tau=TAU, k=2),
                "top-3": partial(calibrated_decision_topk, z, tables, tau=TAU, k=3),
            }
            if h * w <= 1 << 15:
                methods["exact, no bound"] = partial(calibrated_decision, z, tables, tau=TAU, use_bound=False)
            for name, fn in methods.items():
                wall, cpu = median_time(fn, repeats)
                mb = peak_mb(fn)
                agree = float(np.mean(fn() == exact))
                note = ""
                if name == "exact":
                    note = f"bound decides {skipped:.1%} of pixels; {counts.mean():.2f} hypotheses/pixel"
                print(
                    f"{f'{h}x{w}':>9} {case:>9} {name:>15} {1e3 * wall:8.2f} {1e3 * cpu:8.2f} {mb:8.1f} "
                    f"{agree:8.2%}  {note}"
                )
    if not args.quick:
        # Memory stays bounded by the chunk, not the image: the full-resolution case of DESIGN.md §2.
        h, w = 1024, 2048
        z = synthetic_logits(rng, 1, h, w, rng.normal(0, 1.0, C))[0][0]
        fn = partial(calibrated_decision, z, tables, tau=TAU)
        wall, cpu = median_time(fn, 1)
        print(
            f"{f'{h}x{w}':>9} {'realistic':>9} {'exact':>15} {1e3 * wall:8.2f} {1e3 * cpu:8.2f} "
            f"{peak_mb(fn):8.1f} {'':>8}  input {z.nbytes / 2**20:.0f} MB, output int64 {h * w * 8 / 2**20:.0f} MB"
        )


if __name__ == "__main__":
    main()
