"""BLDA's alignment beside the classical corrections of class bias, for the arms of one or more benchmarks:
the README's table from one command.

    PYTHONPATH=. .venv/bin/python scripts/calibrators.py --out runs/calibrators \\
        --benchmark default /work/main/runs/arms/default /work/main/data/synth \\
        --benchmark heldout /work/main/runs/arms/heldout /work/main/data/synth-heldout-1.5

Per checkpoint RUNS/ARM/checkpoint.pt (ARM: source-only, self-training-s{0,1,2}, blda-t0.1-s{0,1,2}) it runs
`blda evaluate --split val --calibrators all` (strengths and the default chosen on the tuning split; the
serving tables are the refit `blda evaluate --split tuning` wrote in RUNS/ARM/evaluate-tuning/tables.npz,
refitted when absent), one at a time under `flock /tmp/blda-cpu.lock`, seed 0 of every model first.
Finished checkpoints are skipped (resumable). Then OUT/calibrators.md: per benchmark and model, mean ± std
over seeds of val mIoU, class-IoU std, mean |Bias(l)| and ECE per calibrator, the decision's cost per
512 x 1024 image, and which calibrator the tuning split picks.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARMS = (
    "source-only",
    "self-training-s0",
    "blda-t0.1-s0",
    "self-training-s1",
    "blda-t0.1-s1",
    "self-training-s2",
    "blda-t0.1-s2",
)
LOCK = "/tmp/blda-cpu.lock"


def family(arm: str) -> str:
    return re.sub(r"-s\d+$", "", arm)


def evaluate(runs: Path, data: Path, arm: str, out: Path) -> Path | None:
    checkpoint = runs / arm / "checkpoint.pt"
    if not checkpoint.is_file():
        print(f"skip {checkpoint}: no such file", flush=True)
        return None
    metrics = out / "metrics.json"
    if metrics.is_file() and "calibrators" in json.loads(metrics.read_text()):
        return metrics
    tables = runs / arm / "evaluate-tuning" / "tables.npz"
    cmd = [
        "flock",
        LOCK,
        sys.executable,
        "-m",
        "blda",
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--out",
        str(out),
        "--split",
        "val",
        "--tau",
        "0",
        "--calibrators",
        "all",
        "--tables",
        str(tables) if tables.is_file() else "refit",
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return metrics


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(name: str, results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"### {name}", ""]
    for fam, runs in results.items():
        defaults = [r["default"] for r in runs]
        lines += [
            f"**{fam}** ({len(runs)} run{'s' if len(runs) > 1 else ''}; default picked on tuning: "
            + ", ".join(f"{d} ×{defaults.count(d)}" for d in dict.fromkeys(defaults))
            + ")",
            "",
            "| calibrator | mIoU | class-IoU std | mean abs Bias (×100) | ECE | cost ms / 512×1024 | strength (tuning) |",
            "|---|---|---|---|---|---|---|",
        ]
        names = [row["calibrator"] for row in runs[0]["val"]]
        for cal in names:
            rows = [next(r for r in run["val"] if r["calibrator"] == cal) for run in runs]
            strengths = sorted({_strength(run["calibrators"][cal]) for run in runs})
            lines.append(
                f"| {cal} | {_ms([r['miou'] for r in rows])} | {_ms([r['iou_std'] for r in rows])} | "
                f"{_ms([r['mean_abs_bias'] for r in rows], digits=3)} | {_ms([r['ece'] for r in rows])} | "
                f"{_ms([r['cost_ms'] for r in rows], 1.0, 0)} | {', '.join(strengths)} |"
            )
        lines += ["", verdict(runs)]
        lines.append("")
    return "\n".join(lines)


CLASSICAL = ("logit-adjust", "em-prior", "bcts", "bcts-em")


def verdict(runs: list[dict[str, Any]]) -> str:
    """The issue's goal, checked on the means over seeds: BLDA lowers mean |Bias| more than every classical
    correction, at an mIoU no worse than theirs."""

    def mean(cal: str, key: str) -> float:
        return statistics.mean(next(r for r in run["val"] if r["calibrator"] == cal)[key] for run in runs)

    names = [r["calibrator"] for r in runs[0]["val"]]
    if "blda" not in names:
        return "Goal: not measured (no blda)."
    classical = [c for c in CLASSICAL if c in names]
    lowest = min(classical, key=lambda c: mean(c, "mean_abs_bias"))
    bias_ok = mean("blda", "mean_abs_bias") < mean(lowest, "mean_abs_bias")
    miou_ok = all(mean("blda", "miou") >= mean(c, "miou") for c in classical)
    best_miou = max(classical, key=lambda c: mean(c, "miou"))
    return (
        f"Goal {'met' if bias_ok and miou_ok else 'missed'}: blda mean abs Bias "
        f"{100 * mean('blda', 'mean_abs_bias'):.3f} vs the lowest classical {lowest} "
        f"{100 * mean(lowest, 'mean_abs_bias'):.3f}; blda mIoU {100 * mean('blda', 'miou'):.2f} vs the best "
        f"classical {best_miou} {100 * mean(best_miou, 'miou'):.2f}."
    )


def _strength(params: dict[str, Any]) -> str:
    if params["tau"] is not None:
        return f"τ={params['tau']:g}"
    if "strength" in params["fit"]:
        return f"τ={params['fit']['strength']:g}"
    if params["temperature"] != 1.0:
        return f"T={params['temperature']:.2f}"
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--benchmark", nargs=3, action="append", metavar=("NAME", "RUNS", "DATA"), required=True
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "calibrators")
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    args = parser.parse_args()
    done: dict[str, dict[str, dict[str, Any]]] = {b[0]: {} for b in args.benchmark}
    for arm in args.arms:  # seed 0 of every model on every benchmark first
        for name, runs, data in args.benchmark:
            path = evaluate(Path(runs), Path(data), arm, args.out / name / arm)
            if path is not None:
                done[name][arm] = json.loads(path.read_text())["calibrators"]
    parts = ["## Calibrators on target val (strengths and default chosen on tuning)", ""]
    for name, runs, _ in args.benchmark:
        by_family: dict[str, list[dict[str, Any]]] = {}
        for arm in sorted(done[name]):
            by_family.setdefault(family(arm), []).append(done[name][arm])
        parts.append(table(f"{name} ({runs})", by_family))
    text = "\n".join(parts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibrators.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
