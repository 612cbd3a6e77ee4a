"""The arms comparison: source-only, self-training and self-training + BLDA over several seeds, each
evaluated with `blda evaluate` on the target val split (raw and with post-hoc calibration at τ = 0.2), and a
summary table of mean ± std.

    .venv/bin/python scripts/run_arms.py --data data/synth --out runs/arms --seeds 0 1 2 --parallel 2 \
        [--set optim.iterations=600 ...]

Runs are resumable: a run whose eval.json exists is not trained again, one with a checkpoint resumes.
Every arm gets the same settings (the `--set` overrides apply to all of them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS = ("blda", "self-training", "source-only")
ROOT = Path(__file__).resolve().parent.parent
BLDA = str(ROOT / ".venv" / "bin" / "blda")


def train_command(arm: str, seed: int, args: argparse.Namespace, run: Path) -> list[str]:
    cmd = [BLDA, "train", "--arm", arm, "--seed", str(seed), "--data", str(args.data), "--out", str(run)]
    cmd += ["--cache-dir", str(args.cache), "--threads", "1", "--resume", "--set", "log.progress=false"]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def evaluate_command(run: Path, args: argparse.Namespace) -> list[str]:
    return [
        BLDA,
        "evaluate",
        "--checkpoint",
        str(run / "checkpoint.pt"),
        "--data",
        str(args.data),
        "--out",
        str(run / "evaluate"),
        "--tau",
        "0.2",
        "--threads",
        "1",
    ]


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> dict[str, int]:
    """Run (name, command, log) jobs, `parallel` at a time; returns exit codes by name."""
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen[bytes], Any]] = []
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("ab")
            print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
            running.append(
                (name, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT), handle)
            )
        time.sleep(2)
        for item in list(running):
            name, proc, handle = item
            if proc.poll() is not None:
                handle.close()
                codes[name] = int(proc.returncode)
                print(f"[{time.strftime('%H:%M:%S')}] done {name}: exit {proc.returncode}", flush=True)
                running.remove(item)
    return codes


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(out: Path, seeds: list[int]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for arm in ARMS:
        per_seed = []
        for seed in seeds:
            run = out / f"{arm}-s{seed}"
            ev_file, mt_file = run / "eval.json", run / "evaluate" / "metrics.json"
            if not (ev_file.is_file() and mt_file.is_file()):
                continue
            ev = json.loads(ev_file.read_text())
            target = json.loads(mt_file.read_text())["target"]
            raw, cal = _pick(target)
            steps = [json.loads(s)["step_seconds"] for s in (run / "metrics.jsonl").read_text().splitlines()]
            per_seed.append(
                {
                    "seed": seed,
                    "miou": raw["miou"],
                    "class_iou_std": raw["class_iou_std"],
                    "miou_calibrated": cal["miou"] if cal else None,
                    "class_iou_std_calibrated": cal["class_iou_std"] if cal else None,
                    "train_seconds": ev["train_seconds"],
                    "median_step_seconds": statistics.median(steps[len(steps) // 2 :]),
                    "loop_eval_miou": ev["miou"],
                }
            )
        if per_seed:
            rows[arm] = {"runs": per_seed}
            for key in (
                "miou",
                "class_iou_std",
                "miou_calibrated",
                "class_iou_std_calibrated",
                "train_seconds",
            ):
                vals = [r[key] for r in per_seed if r[key] is not None]
                rows[arm][key] = _mean_std(vals)
    return rows


def _pick(target: dict[str, Any]) -> tuple[dict[str, float], dict[str, float] | None]:
    """(raw, calibrated at τ = 0.2) mIoU and class-IoU std in % from `blda evaluate`'s target metrics."""

    def pct(m: dict[str, Any]) -> dict[str, float]:
        return {"miou": 100 * float(m["miou"]), "class_iou_std": 100 * float(m["iou_std"])}

    cal = target.get("calibrated", {}).get("0.2")
    return pct(target["raw"]), (pct(cal) if cal else None)


def table(rows: dict[str, Any]) -> str:
    lines = [
        "| arm | mIoU | class-IoU std | mIoU, post-hoc τ=0.2 | class-IoU std, post-hoc | train s |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in rows.items():
        cells = [arm]
        for key in ("miou", "class_iou_std", "miou_calibrated", "class_iou_std_calibrated", "train_seconds"):
            m, s = r[key]
            cells.append(f"{m:.2f} ± {s:.2f}" if m == m else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synth")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "arms")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="override for every arm (repeatable)")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    if not args.summary_only:
        jobs = []
        for seed in args.seeds:
            for arm in args.arms:
                run = args.out / f"{arm}-s{seed}"
                if not (run / "eval.json").is_file():
                    jobs.append(
                        (f"train {arm} s{seed}", train_command(arm, seed, args, run), run / "train.log")
                    )
        codes = run_jobs(jobs, args.parallel)
        evals = []
        for seed in args.seeds:
            for arm in args.arms:
                run = args.out / f"{arm}-s{seed}"
                if (run / "eval.json").is_file() and not (run / "evaluate" / "metrics.json").is_file():
                    evals.append(
                        (f"evaluate {arm} s{seed}", evaluate_command(run, args), run / "evaluate.log")
                    )
        codes.update(run_jobs(evals, args.parallel))
        failed = {k: v for k, v in codes.items() if v != 0}
        if failed:
            print(f"failed: {failed}", file=sys.stderr)
    rows = summarise(args.out, args.seeds)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
