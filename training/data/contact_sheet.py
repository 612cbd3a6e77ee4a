"""A contact sheet: source and target samples side by side with their labels overlaid, as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from calibration.classes import IGNORE_INDEX, colorize
from training.data.datasets import Sample, open_dataset


def overlay(sample: Sample, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: the image blended with its label colours; ignored pixels stay as they are."""
    colors = colorize(sample.label).astype(np.float32)
    img = sample.image.astype(np.float32)
    mask = (sample.label != IGNORE_INDEX)[..., None]
    out = np.where(mask, (1 - alpha) * img + alpha * colors, img)
    return out.astype(np.uint8)


def sheet(rows: Sequence[tuple[str, Sample]], tile_width: int = 384) -> Image.Image:
    """One row per sample: image | overlay, with a caption."""
    tiles = []
    for caption, s in rows:
        h, w = s.label.shape
        th = round(h * tile_width / w)
        pair = np.concatenate([s.image, overlay(s)], axis=1)
        im = Image.fromarray(pair).resize((2 * tile_width, th), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (2 * tile_width, th + 14), (255, 255, 255))
        canvas.paste(im, (0, 14))
        ImageDraw.Draw(canvas).text((4, 1), caption, fill=(0, 0, 0))
        tiles.append(canvas)
    total_h = sum(t.height for t in tiles)
    out = Image.new("RGB", (2 * tile_width, total_h), (255, 255, 255))
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.height
    return out


def benchmark_sheet(
    data: Path,
    count: int = 4,
    seed: int = 0,
    split: str = "val",
    source_format: str = "gta5",
    target_format: str = "cityscapes",
) -> Image.Image:
    """Source samples (data/source, default GTA5 layout) beside target samples (data/target, default
    Cityscapes layout); the formats are those of training.data.datasets.FORMATS."""
    source = open_dataset(source_format, Path(data) / "source", "train")
    target = open_dataset(target_format, Path(data) / "target", split)
    rng = np.random.default_rng(seed)
    src_idx = rng.choice(len(source), size=min(count, len(source)), replace=False)
    tgt_idx = rng.choice(len(target), size=min(count, len(target)), replace=False)
    rows: list[tuple[str, Sample]] = []
    for i, j in zip(src_idx, tgt_idx, strict=False):
        s, t = source[int(i)], target[int(j)]
        rows.append((f"source {s.name}", s))
        rows.append((f"target/{split} {t.name}", t))
    # two columns: sources left, targets right
    left = sheet(rows[0::2])
    right = sheet(rows[1::2])
    out = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + 8, 0))
    return out
