"""Per-class comparison of two arms from their `blda evaluate` outputs (paired by seed): IoU, predicted pixel
share against the true share, and Bias(l), averaged over the seeds. Where does one arm gain or lose?

    .venv/bin/python scripts/compare_classes.py --runs runs/arms/default --base self-training \\
        --other blda-t0.1 --seeds 0 1 2 --split tuning [--tau 0]

Reads RUNS/<arm>-s<seed>/evaluate-<split>/metrics.json (written by scripts/run_arms.py); `--tau` > 0 reads
the calibrated decision at that τ instead of the raw one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _decision(path: Path, tau: float) -> dict[str, Any]:
    target = json.loads(path.read_text())["target"]
    return target["raw"] if tau == 0 else target["calibrated"][f"{tau:g}"]


def _mean(rows: list[list[float | None]], index: int) -> float | None:
    values = [r[index] for r in rows if r[index] is not None]
    return statistics.fmean(v for v in values if v is not None) if values else None


def compare(
    runs: Path, base: str, other: str, seeds: list[int], split: str, tau: float
) -> list[dict[str, Any]]:
    classes = json.loads((runs / f"{base}-s{seeds[0]}" / f"evaluate-{split}" / "metrics.json").read_text())[
        "target"
    ]["classes"]
    per: dict[str, dict[str, list[list[float | None]]]] = {}
    for arm in (base, other):
        decisions = [
            _decision(runs / f"{arm}-s{s}" / f"evaluate-{split}" / "metrics.json", tau) for s in seeds
        ]
        per[arm] = {
            key: [d[key] for d in decisions] for key in ("iou", "predicted_fraction", "true_fraction", "bias")
        }
    rows = []
    for i, name in enumerate(classes):
        row: dict[str, Any] = {"class": name, "true_share": _mean(per[base]["true_fraction"], i)}
        for arm in (base, other):
            row[f"{arm}_iou"] = _mean(per[arm]["iou"], i)
            row[f"{arm}_share"] = _mean(per[arm]["predicted_fraction"], i)
            row[f"{arm}_bias"] = _mean(per[arm]["bias"], i)
        rows.append(row)
    return rows


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--other", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="tuning", choices=["tuning", "val"])
    parser.add_argument("--tau", type=float, default=0.0)
    args = parser.parse_args()
    rows = compare(args.runs, args.base, args.other, args.seeds, args.split, args.tau)
    b, o = args.base, args.other
    print(f"| class | true share % | {b} share % | {o} share % | {b} IoU | {o} IoU | Δ IoU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gain = None if r[f"{o}_iou"] is None or r[f"{b}_iou"] is None else r[f"{o}_iou"] - r[f"{b}_iou"]
        print(
            f"| {r['class']} | {_pct(r['true_share'])} | {_pct(r[f'{b}_share'])} | {_pct(r[f'{o}_share'])} "
            f"| {_pct(r[f'{b}_iou'])} | {_pct(r[f'{o}_iou'])} | {_pct(gain)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
