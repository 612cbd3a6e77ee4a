"""BLDA iteration cost against the self-training baseline at the same batch (target: at most 1.3x, on the
mean, which includes the table rebuilds every `blda.table_every` iterations).

Every arm runs full iterations (source step, teacher pseudo-labels, ClassMix step; BLDA adds the GMM updates
of both domains, the amortised table rebuilds and the corrected losses) on the same in-memory 128x256
batches, interleaved so that load from other processes hits every arm alike; one thread. Rows: the default
(Δ and GMM samples at label resolution), Δ at the logits' resolution, the CDF head on both domains, and the
corrected pseudo-labels.

    python -m bench training [--quick] [--network mobilenet_lraspp] [--iterations 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from training.data.datasets import Sample


class _Scenes:
    """Blocky 256x512 scenes with 19 classes (data loading is not what this measures)."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            blocks = rng.integers(0, 19, size=(8, 16))
            label = np.kron(blocks, np.ones((32, 32), dtype=np.int64)).astype(np.uint8)
            colours = rng.integers(0, 256, size=(19, 3))
            image = (colours[label] + rng.integers(0, 30, (256, 512, 3))).clip(0, 255).astype(np.uint8)
            self.items.append(Sample(image, label, str(i)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        return self.items[index]


def main() -> None:
    from training.config import load_config
    from training.uda.loop import Domains, StepContext, build_state, train_step

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--network", default="mobilenet_lraspp")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=12)
    args = parser.parse_args()
    iterations = 10 if args.quick else args.iterations
    warmup = 4 if args.quick else args.warmup
    torch.set_num_threads(1)
    domains = Domains(_Scenes(8, 0), _Scenes(8, 1), _Scenes(2, 2))
    common = [
        f"model.network={args.network}",
        "self_training.start_iter=0",
        "blda.start_iter=1",
        "data.rare_class_sampling=false",
        f"optim.iterations={warmup + iterations + 1}",
    ]
    arms = {arm: load_config(arm, overrides=common) for arm in ("self-training", "blda")}
    arms["blda@logits"] = load_config("blda", overrides=[*common, "blda.delta_resolution=logits"])
    arms["blda+cdf"] = load_config("blda", overrides=[*common, "blda.cdf_weight=0.2"])
    # The ablation that also corrects the teacher's pseudo-labels (top-2 hypotheses per pixel).
    arms["blda+pseudo"] = load_config("blda", overrides=[*common, "blda.correct_pseudo_labels=true"])
    states = {arm: build_state(cfg) for arm, cfg in arms.items()}
    ctxs = {arm: StepContext(cfg=cfg, domains=domains) for arm, cfg in arms.items()}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for i in range(warmup + iterations):
        for arm in arms:
            t0 = time.perf_counter()
            train_step(states[arm], ctxs[arm])
            if i >= warmup:
                times[arm].append(time.perf_counter() - t0)
    base_med = statistics.median(times["self-training"])
    base_mean = statistics.fmean(times["self-training"])
    print(
        f"network={args.network}, batch 2 source + 2 target, 128x256 crops, 1 thread, {iterations} iterations"
    )
    print(f"{'arm':>14} {'median ms':>10} {'mean ms':>9} {'ratio (median)':>15} {'ratio (mean)':>13}")
    for arm, ts in times.items():
        med, mean = statistics.median(ts), statistics.fmean(ts)
        print(
            f"{arm:>14} {med * 1e3:>10.1f} {mean * 1e3:>9.1f} {med / base_med:>15.2f} {mean / base_mean:>13.2f}"
        )
    ratio = statistics.fmean(times["blda"]) / base_mean
    print(f"BLDA / baseline (mean) = {ratio:.2f} (target <= 1.30): {'met' if ratio <= 1.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
