"""Does decoding JPEG at the model's scale cost accuracy? mIoU through the service path with and without it.

    .venv/bin/python -m bench decode_scaling [--quick] [--limit=N] [--data=DIR]

The benchmark's target val (`--data=DIR`, default $BLDA_DATA, else data/synth; Cityscapes layout,
256 x 512 PNGs) is upscaled (bilinear) to 512 x 1024 and 1024 x 2048, so that the shipped model's
128 x 256 input is 1/4 and 1/8 of the image, and encoded as JPEG at quality 90. Each JPEG goes through
`service.pipeline.segment_bytes` (the route's code, in-process) with `scaled_decode` on and off; the PNG
body it returns is decoded and scored against the labels (nearest-upscaled: each label pixel is an exact
k x k block). Both the served decision (calibrated when the model's default says so) and the raw one
are scored. Target: |mIoU(scaled) - mIoU(full)| <= 0.2 points at both sizes.
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from bench.service import REPO, default_bundle
from calibration.bias import confusion_matrix, iou_from_confusion
from calibration.segmentation import resize_nearest
from service.inference import load_served_model
from service.pipeline import options_from, segment_bytes
from service.settings import ServiceSettings

SIZES = ((512, 1024), (1024, 2048))
QUALITY = 90


def jpeg_at(rgb: np.ndarray, size: tuple[int, int]) -> bytes:
    """(h, w, 3) uint8 -> JPEG bytes of the image upscaled (bilinear) to size (H, W)."""
    image = Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def miou(conf: np.ndarray) -> float:
    return float(np.nanmean(iou_from_confusion(conf)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BLDA_DATA", REPO / "data" / "synth"))
    )
    parser.add_argument("--limit", type=int, default=0, help="first N val images (0: all)")
    parser.add_argument("--quick", action="store_true", help="the first 40 val images")
    args = parser.parse_args()
    if not (args.data / "target").is_dir():
        print(f"skipped: no benchmark at {args.data} (`blda synth --out data/synth`, or --data=DIR)")
        return
    from training.datasets import open_split  # torch: imported only when this benchmark runs

    val = open_split(args.data, "target", "val")
    count = len(val) if not (args.limit or args.quick) else min(len(val), args.limit or 40)
    model = load_served_model(default_bundle(args.models_dir), ServiceSettings().onnx_threads())
    settings = ServiceSettings()
    c = model.num_classes
    base = options_from(settings, model.calibrate_default, model.tau_default)
    print(
        f"bundle {model.name}/{model.version}, {count} target val images of {args.data}, JPEG quality "
        f"{QUALITY}, served decision {'calibrated' if base.calibrate else 'raw'} (tau {base.tau:g})"
    )
    print(f"{'image size':<12} {'decision':<10} {'full decode':>12} {'scaled':>8} {'difference':>11}  target")
    for size in SIZES:
        conf = {(scaled, kind): np.zeros((c, c), np.int64) for scaled in (False, True) for kind in ("s", "r")}
        for index in range(count):
            sample = val[index]
            data = jpeg_at(sample.image, size)
            factor = size[0] // sample.label.shape[0]
            labels = np.repeat(np.repeat(sample.label, factor, axis=0), factor, axis=1)  # (H, W)
            for scaled in (False, True):
                done = segment_bytes(model, data, replace(base, scaled_decode=scaled))
                served = np.asarray(Image.open(io.BytesIO(done.body)))  # the PNG the client gets
                conf[scaled, "s"] += confusion_matrix(served, labels, c)
                if base.calibrate:
                    conf[scaled, "r"] += confusion_matrix(resize_nearest(done.decision.raw, *size), labels, c)
        for kind, label in (("s", "served"), ("r", "raw")):
            if kind == "r" and not base.calibrate:
                continue
            full, scaled_ = miou(conf[False, kind]) * 100, miou(conf[True, kind]) * 100
            print(
                f"{f'{size[0]}x{size[1]}':<12} {label:<10} {full:>12.2f} {scaled_:>8.2f} "
                f"{scaled_ - full:>+11.2f}  |d| <= 0.2"
            )


if __name__ == "__main__":
    main()
