"""Mask detail: decisions on bilinearly upsampled logits (the pipeline) against the old logit-grid decision.

    .venv/bin/python -m bench detail [--images 8] [--quick]

Default bundle (models/), synthetic target-domain street scenes rendered at 512 x 1024 with their labels
(training.data.synth, numpy + Pillow only). For each image, the served pipeline (service.pipeline: logits
upsampled to the model's input size x decision_scale, then nearest to the image) against deciding on the
logit grid and resizing the decision by nearest neighbour (the service before issue 11). Reported:

- full-resolution mIoU and the IoU of thin classes, raw and calibrated, both ways;
- block structure: the fraction of label transitions (between horizontal or vertical neighbours) that lie
  on the logit grid's cell boundaries; 1 for the old masks (every transition is a 16-pixel block edge);
  for smooth masks about the share of pixel boundaries that are grid boundaries, 1/16 here, or 1/8 of the
  2-pixel steps a 256 x 512 decision can make;
- the exact bound: the share of pixels the calibrated rule settles without evaluating any hypothesis, on
  the logit grid and at the decision size (boundary pixels are the ambiguous ones, and upsampling makes
  more of them), and the calibrated decision's time both ways.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.service import HEIGHT, WIDTH, default_bundle
from calibration.alignment import calibrated_decision, candidate_counts
from calibration.bias import confusion_matrix, iou_from_confusion
from calibration.segmentation import decide, decision_size, resize_nearest, upsample_bilinear
from service.imaging import preprocess
from service.inference import load_served_model
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parent.parent
THIN = ("pole", "traffic light", "traffic sign", "person", "rider", "bicycle", "motorcycle")


def target_scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from training.data.synth.config import SceneConfig, ShiftConfig, domain_configs
    from training.data.synth.scene import render_scene

    _, target = domain_configs(ShiftConfig())
    return render_scene(np.random.default_rng(seed), SceneConfig(height=HEIGHT, width=WIDTH), target)


def on_grid_fraction(mask: np.ndarray, cell: tuple[float, float]) -> float:
    """Share of label transitions between neighbours that cross a logit-grid cell boundary."""
    dy = mask[1:] != mask[:-1]  # (H-1, W): transition between rows i and i+1
    dx = mask[:, 1:] != mask[:, :-1]  # (H, W-1)
    # Boundary between pixel i and i+1 is at i+1 image pixels; a grid line where that is a multiple of cell.
    y_on = (np.arange(1, mask.shape[0]) % cell[0] == 0)[:, None]
    x_on = (np.arange(1, mask.shape[1]) % cell[1] == 0)[None, :]
    total = dy.sum() + dx.sum()
    return float(((dy & y_on).sum() + (dx & x_on).sum()) / max(int(total), 1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 images")
    parser.add_argument("--scale", type=float, default=None, help="decision_scale [default: the setting's]")
    args = parser.parse_args()
    count = 4 if args.quick else args.images

    settings = ServiceSettings() if args.scale is None else ServiceSettings(decision_scale=args.scale)
    model = load_served_model(default_bundle(args.models_dir), settings.onnx_threads())
    tables = model.bundle.tables
    assert tables is not None, "the bundle needs calibration tables"
    tau = model.tau_default
    names = model.bundle.manifest.class_names
    c = len(names)
    conf = {k: np.zeros((c, c), np.int64) for k in ("old_raw", "old_cal", "new_raw", "new_cal")}
    grid = {k: [] for k in ("old", "new")}  # type: dict[str, list[float]]
    settled = {k: [] for k in ("old", "new")}  # type: dict[str, list[float]]
    seconds = {k: 0.0 for k in ("old", "new")}
    changed = {k: 0 for k in ("old", "new")}
    size_used = (0, 0)
    for seed in range(1000, 1000 + count):
        rgb, label = target_scene(seed)
        input_size = model.input_size(HEIGHT, WIDTH)
        logits = model.run(preprocess(rgb, input_size, model.norm))[0]  # (C, h, w)
        cell = (HEIGHT / logits.shape[1], WIDTH / logits.shape[2])
        started = time.perf_counter()
        old_cal = calibrated_decision(logits, tables.shifts, tau)
        seconds["old"] += time.perf_counter() - started
        old = {"raw": logits.argmax(0), "cal": old_cal}
        size_used = decision_size((HEIGHT, WIDTH), input_size, settings.decision_scale)
        started = time.perf_counter()
        made = decide(logits, size_used, tables.shifts, (tau,), settings.calibration_chunk_pixels)
        seconds["new"] += time.perf_counter() - started
        new = {"raw": made.raw, "cal": made.calibrated[0]}
        for way, masks in (("old", old), ("new", new)):
            full = {k: resize_nearest(m.astype(np.uint8), HEIGHT, WIDTH) for k, m in masks.items()}
            for k, m in full.items():
                conf[f"{way}_{k}"] += confusion_matrix(m, label, c)
            grid[way].append(on_grid_fraction(full["cal"], cell))
            changed[way] += int((full["raw"] != full["cal"]).sum())
        settled["old"].append(float((candidate_counts(logits, tables.shifts, tau) == 1).mean()))
        up = upsample_bilinear(logits, size_used)
        settled["new"].append(float((candidate_counts(up, tables.shifts, tau) == 1).mean()))

    iou = {k: iou_from_confusion(v) for k, v in conf.items()}

    def miou(v: np.ndarray) -> float:
        return float(np.nanmean(v))

    print(f"{model.name}/{model.version}, {count} target scenes at {HEIGHT}x{WIDTH}, tau {tau:g}")
    print(
        f"logits {logits.shape[1]}x{logits.shape[2]} (cells {cell[0]:g}x{cell[1]:g} px), decision {size_used}"
    )
    print()
    print("| | logit grid + nearest (old) | bilinear to decision size (new) |")
    print("|---|---|---|")
    print(f"| mIoU raw | {miou(iou['old_raw']):.4f} | {miou(iou['new_raw']):.4f} |")
    print(f"| mIoU calibrated | {miou(iou['old_cal']):.4f} | {miou(iou['new_cal']):.4f} |")
    for name in THIN:
        if name in names:
            i = names.index(name)
            print(f"| IoU {name} (cal) | {iou['old_cal'][i]:.4f} | {iou['new_cal'][i]:.4f} |")
    print(
        f"| transitions on logit-grid lines (cal) | {np.mean(grid['old']):.3f} | {np.mean(grid['new']):.3f} "
        f"(1/cell = {1 / cell[1]:.3f}) |"
    )
    print(
        f"| pixels settled by the exact bound | {np.mean(settled['old']):.1%} | {np.mean(settled['new']):.1%} |"
    )
    print(f"| pixels changed by calibration | {changed['old'] / count:.0f} | {changed['new'] / count:.0f} |")
    print(
        f"| decision time per image (raw + calibrated) | {1000 * seconds['old'] / count:.1f} ms "
        f"(calibrated only) | {1000 * seconds['new'] / count:.1f} ms |"
    )


if __name__ == "__main__":
    main()
