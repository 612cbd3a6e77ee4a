"""Generate the shipped example: class-biased logits drawn from known mixtures, source and target.

    .venv/bin/python examples/make_example.py [--out examples/data] [--seed 0]

Source: 8 images of 32x64 pixels, 19 classes, labels as random rectangles on a background. For a pixel of
class c, logit l is drawn from a two-component mixture: "positive" (l = c) around +4, "negative" around -1,
plus a per-class offset. Target: the same scenes re-drawn with a domain shift that lowers the logits of
some classes (the hard, under-predicted ones) and raises others, so the raw argmax is biased on target and
the calibration tables fitted by `blda calibrate fit` have something to correct.
Logits are stored as float16 (.npz, key "logits") to keep the example small; labels as uint8 .npy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

C, N, H, W = 19, 8, 32, 64
# Frequent "stuff" classes first, like road/building/vegetation in Cityscapes.
FREQ = np.array([30, 12, 15, 3, 3, 4, 1, 1.5, 12, 3, 6, 2, 1, 5, 1, 1, 0.8, 0.8, 1.2])


def draw_labels(rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) uint8: a background class per image, then rectangles of classes drawn by FREQ."""
    labels = np.empty((N, H, W), dtype=np.uint8)
    p = FREQ / FREQ.sum()
    for i in range(N):
        labels[i] = rng.choice([0, 2, 8], p=[0.5, 0.25, 0.25])
        for _ in range(rng.integers(12, 20)):
            c = rng.choice(C, p=p)
            h, w = rng.integers(3, 14), rng.integers(3, 22)
            y, x = rng.integers(0, H - h), rng.integers(0, W - w)
            labels[i, y : y + h, x : x + w] = c
        labels[i][rng.random((H, W)) < 0.01] = 255  # a few ignored pixels
    return labels


def draw_logits(labels: np.ndarray, offset: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) labels, (C,) per-class logit offsets -> (N, C, H, W) float16 logits."""
    lab = np.where(labels == 255, 0, labels).astype(np.int64)
    onehot = np.eye(C, dtype=bool)[lab].transpose(0, 3, 1, 2)  # (N, C, H, W)
    # Two-component mixtures: a confident mode and an uncertain one.
    confident = rng.random(onehot.shape) < 0.7
    pos = np.where(confident, rng.normal(4.0, 1.0, onehot.shape), rng.normal(1.5, 1.0, onehot.shape))
    neg = np.where(confident, rng.normal(-1.5, 1.0, onehot.shape), rng.normal(0.5, 1.2, onehot.shape))
    z = np.where(onehot, pos, neg) + offset[None, :, None, None]
    return z.astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    src_offset = rng.normal(0.0, 0.3, C)
    # Domain shift: rare classes lose confidence on target, frequent ones gain it.
    tgt_offset = src_offset + np.where(FREQ < 2, -1.5, 0.0) + np.where(FREQ > 10, 1.0, 0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, offset in (("source", src_offset), ("target", tgt_offset)):
        labels = draw_labels(rng)
        np.savez_compressed(args.out / f"{name}_logits.npz", logits=draw_logits(labels, offset, rng))
        np.save(args.out / f"{name}_labels.npy", labels)
    print(f"wrote {args.out}/{{source,target}}_{{logits.npz,labels.npy}}")


if __name__ == "__main__":
    main()
