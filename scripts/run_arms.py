"""The arms comparison, warm-started: one converged source-only model per benchmark, then self-training and
BLDA variants from it over several seeds, chosen on the tuning split and reported on val once.

    .venv/bin/python scripts/run_arms.py --data data/synth --out runs/arms/default --seeds 0 1 2 \\
        --variant self-training=self-training --variant blda-t0.1=blda:blda.t=0.1 [--parallel 2]

Per benchmark (`--data`) the script
1. trains `source-only` from scratch (`--source-iterations`, seed 0): the shared start of every arm;
2. trains every variant × seed from it (`model.init_checkpoint`), evaluating the tuning split every
   `--eval-every` iterations (the curve: metrics.jsonl) and at the end (eval.json);
3. evaluates every run with `blda evaluate --split tuning` at each τ of `--taus` (serving tables refitted
   on target train), and picks per variant the τ with the best mean tuning mIoU (0: calibration off);
4. evaluates every run once on `--split val` (the summary reads it raw and at the tuning-chosen τ only);
5. writes summary.json and summary.md: tuning and val mIoU (mean ± std over seeds), class-IoU std, paired
   differences against `--baseline`, the chosen τ, and which BLDA variant the tuning split picks.

Nothing is chosen on val. Runs are resumable: finished steps are skipped, a stopped run resumes.
A variant is NAME=ARM[:key=value[,key=value...]] (the settings are `blda train --set` overrides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BLDA = str(ROOT / ".venv" / "bin" / "blda")
SOURCE_RUN = "source-only"
# Warm-started arms adapt from iteration 0; the correction starts once the GMMs have seen some batches.
WARM_START = ("self_training.start_iter=0", "blda.start_iter=50")


@dataclass(frozen=True)
class Variant:
    name: str
    arm: str
    settings: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--variant: expected NAME=ARM[:key=value,...], got {text!r}")
    name, rest = text.split("=", 1)
    arm, _, settings = rest.partition(":")
    if arm not in ("self-training", "blda", "source-only") or not name:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected an arm in source-only|self-training|blda"
        )
    return Variant(name, arm, tuple(s for s in settings.split(",") if s))


def train_command(arm: str, seed: int, settings: list[str], args: argparse.Namespace, run: Path) -> list[str]:
    cmd = [BLDA, "train", "--arm", arm, "--seed", str(seed), "--data", str(args.data), "--out", str(run)]
    cmd += ["--cache-dir", str(args.cache), "--threads", "1", "--resume"]
    for item in [
        "log.progress=false",
        "data.eval_split=tuning",
        f"log.eval_every={args.eval_every}",
        *settings,
    ]:
        cmd += ["--set", item]
    return cmd


def evaluate_command(
    run: Path, split: str, taus: list[float], out: Path, args: argparse.Namespace
) -> list[str]:
    cmd = [BLDA, "evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(args.data)]
    cmd += ["--split", split, "--out", str(out), "--threads", "1"]
    for tau in taus:
        cmd += ["--tau", f"{tau:g}"]
    if args.classes is not None:  # the mIoU every choice and the summary use: 16 / 13 for SYNTHIA sources
        cmd += ["--classes", str(args.classes)]
    return cmd


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


def _mean_std(values: list[float]) -> list[float | None] | None:
    """[mean, std over seeds]; std None for a single run (a spread of one run would read as 0)."""
    if not values:
        return None
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None]


def _target(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text())["target"] if path.is_file() else None


def _pct(m: dict[str, Any] | None, key: str = "miou") -> float | None:
    return None if m is None or m.get(key) is None else 100 * float(m[key])


def choose_tau(tuning: list[dict[str, Any]], taus: list[float]) -> float:
    """The τ (0 = raw) with the best mean tuning mIoU over the seeds; raw wins ties."""
    best_tau, best = 0.0, statistics.fmean(_pct(t["raw"]) or 0.0 for t in tuning)
    for tau in taus:
        values = [_pct(t["calibrated"].get(f"{tau:g}")) for t in tuning]
        if None in values:
            continue
        mean = statistics.fmean(v for v in values if v is not None)
        if mean > best + 1e-9:
            best_tau, best = tau, mean
    return best_tau


def _decision(target: dict[str, Any], tau: float) -> dict[str, Any]:
    return target["raw"] if tau == 0 else target["calibrated"][f"{tau:g}"]


def summarise(args: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for v in variants:
        # The seeds that have been evaluated (a variant tried on fewer seeds says so in its row).
        runs = [r for r in _variant_runs(args, v) if (r / "evaluate-tuning" / "metrics.json").is_file()]
        tuning = [t for t in (_target(r / "evaluate-tuning" / "metrics.json") for r in runs) if t]
        if not runs:
            continue
        tau = choose_tau(tuning, args.taus)
        val = [t for t in (_target(r / "evaluate-val" / "metrics.json") for r in runs) if t]
        per_seed: list[dict[str, Any]] = []
        for run, tun, va in zip(runs, tuning, val + [None] * (len(runs) - len(val)), strict=True):
            per_seed.append(
                {
                    "run": str(run),
                    "seed": int(run.name.rsplit("-s", 1)[1]) if v.arm != "source-only" else None,
                    "tuning_miou": _pct(tun["raw"]),
                    "tuning_miou_calibrated": _pct(_decision(tun, tau)),
                    "val_miou": _pct(va["raw"]) if va else None,
                    "val_class_iou_std": _pct(va["raw"], "iou_std") if va else None,
                    "val_miou_calibrated": _pct(_decision(va, tau)) if va else None,
                    "val_class_iou_std_calibrated": _pct(_decision(va, tau), "iou_std") if va else None,
                    "val_pit_deviation": va["pit"]["mean_abs_deviation"] if va and va.get("pit") else None,
                    "curve": _curve(run),
                }
            )
        row: dict[str, Any] = {"arm": v.arm, "settings": list(v.settings), "tau": tau, "runs": per_seed}
        for key in per_seed[0]:
            if key.endswith(("miou", "std", "calibrated", "deviation")):
                row[key] = _mean_std([r[key] for r in per_seed if r[key] is not None])
        rows[v.name] = row
    base = rows.get(args.baseline)
    for row in rows.values():
        if base is not None:
            for key in ("tuning_miou", "val_miou"):
                # Paired by seed; the source-only model is the shared start of every seed.
                pairs = [
                    a[key] - b[key]
                    for a in row["runs"]
                    for b in base["runs"]
                    if (a["seed"] is None or a["seed"] == b["seed"])
                    and a[key] is not None
                    and b[key] is not None
                ]
                row[f"{key}_vs_baseline"] = _mean_std(pairs)
    blda = {n: r for n, r in rows.items() if r["arm"] == "blda"}
    chosen = max(blda, key=lambda n: blda[n]["tuning_miou"][0]) if blda else None
    for row in rows.values():
        row["seeds"] = len(row["runs"])
    return {
        "data": str(args.data),
        "baseline": args.baseline,
        "chosen_blda_on_tuning": chosen,
        "variants": rows,
    }


def _curve(run: Path) -> list[list[float]]:
    """(iteration, tuning mIoU %) of the evaluations during training (training-time BatchNorm statistics),
    from metrics.jsonl, whose lines repeat the last evaluation: each new value is one evaluation; the last
    point is the final one, after AdaBN (eval.json)."""
    points: list[list[float]] = []
    log = run / "metrics.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        rec = json.loads(line)
        if "miou" in rec and (not points or points[-1][1] != 100 * rec["miou"]):
            points.append([int(rec["iteration"]), 100 * float(rec["miou"])])
    final = run / "eval.json"
    if final.is_file():  # the end of training, after AdaBN re-estimated the BatchNorm statistics on target
        ev = json.loads(final.read_text())
        points.append([int(ev["iteration"]), 100 * float(ev["miou"])])
    return points


def _fmt(ms: list[float | None] | None) -> str:
    if ms is None or ms[0] is None:
        return "–"
    return f"{ms[0]:.2f}" if ms[1] is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| variant (seeds) | tuning mIoU | Δ tuning vs baseline | τ (tuning) | val mIoU | val class-IoU std "
        "| val mIoU, calibrated at τ | val class-IoU std, calibrated | Δ val vs baseline | PIT dev. (val) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["variants"].items():
        mark = " (chosen on tuning)" if name == summary["chosen_blda_on_tuning"] else ""
        pit = r.get("val_pit_deviation")
        lines.append(
            f"| {name}{mark} ({r['seeds']}) | {_fmt(r.get('tuning_miou'))} | {_fmt(r.get('tuning_miou_vs_baseline'))} "
            f"| {r['tau']:g} | {_fmt(r.get('val_miou'))} | {_fmt(r.get('val_class_iou_std'))} "
            f"| {_fmt(r.get('val_miou_calibrated'))} | {_fmt(r.get('val_class_iou_std_calibrated'))} "
            f"| {_fmt(r.get('val_miou_vs_baseline'))} | {'–' if pit is None else f'{pit[0]:.3f}'} |"
        )
    return "\n".join(lines)


def _variant_runs(args: argparse.Namespace, v: Variant) -> list[Path]:
    if v.arm == "source-only":
        return [args.out / SOURCE_RUN]
    return [args.out / f"{v.name}-s{seed}" for seed in args.seeds]


def _plot_curves(curves: dict[str, Any], path: Path, title: str) -> None:
    sys.path.insert(0, str(ROOT))
    from training.evaluation.plots import plot_curves

    plot_curves(curves, path, title)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synth")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "arms" / "default")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", type=parse_variant, action="append", default=[])
    parser.add_argument(
        "--baseline", default="self-training", help="variant the paired differences are against"
    )
    parser.add_argument("--iterations", type=int, default=1200, help="iterations of each adaptation run")
    parser.add_argument("--source-iterations", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument(
        "--classes",
        type=int,
        choices=[19, 16, 13],
        help="classes the evaluated mIoU averages (blda evaluate)",
    )
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="stop after training")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument(
        "--summary", default="summary", help="file stem of the summary (json, md, -curves.png)"
    )
    args = parser.parse_args()
    variants: list[Variant] = [Variant("source-only", "source-only", ()), *args.variant]
    if not args.summary_only:
        source = args.out / SOURCE_RUN
        if not (source / "eval.json").is_file():
            cmd = train_command(
                "source-only", 0, [f"optim.iterations={args.source_iterations}"], args, source
            )
            run_jobs([("train source-only", cmd, source / "train.log")], 1)
        init = source / "checkpoint.pt"
        jobs = []
        for seed in args.seeds:
            for v in variants[1:]:
                run = args.out / f"{v.name}-s{seed}"
                if not (run / "eval.json").is_file():
                    settings = [f"model.init_checkpoint={init}", f"optim.iterations={args.iterations}"]
                    cmd = train_command(v.arm, seed, [*settings, *WARM_START, *v.settings], args, run)
                    jobs.append((f"train {v.name} s{seed}", cmd, run / "train.log"))
        codes = run_jobs(jobs, args.parallel)
        if not args.train_only:
            # Both splits at every τ of the grid (the tables' PIT check comes with them); the summary reads
            # val only at the τ the tuning split chose.
            for split in ("tuning", "val"):
                evals = []
                for v in variants:
                    for run in _variant_runs(args, v):
                        out = run / f"evaluate-{split}"
                        if (run / "checkpoint.pt").is_file() and not (out / "metrics.json").is_file():
                            cmd = evaluate_command(run, split, args.taus, out, args)
                            refit = run / "evaluate-tuning" / "tables.npz"
                            if split == "val" and refit.is_file():
                                cmd += ["--tables", str(refit)]  # the same serving tables, not refitted again
                            evals.append((f"evaluate {split} {run.name}", cmd, run / f"evaluate-{split}.log"))
                codes.update(run_jobs(evals, args.parallel))
        failed = {k: v for k, v in codes.items() if v != 0}
        if failed:
            print(f"failed: {failed}", file=sys.stderr)
    summary = summarise(args, variants)
    (args.out / f"{args.summary}.json").write_text(json.dumps(summary, indent=2))
    text = table(summary)
    (args.out / f"{args.summary}.md").write_text(text + "\n")
    curves = {
        name: [r["curve"] for r in row["runs"]]
        for name, row in summary["variants"].items()
        if row["arm"] != "source-only"
    }
    _plot_curves(
        curves, args.out / f"{args.summary}-curves.png", f"{args.data.name}: mIoU against iterations"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
