"""What the service's stages are measured against: the plain pipeline anyone could write, and per stage the
fastest way a well-kept library offers (its floor).

Each ``*_ways`` function returns named zero-argument calls doing one stage in different ways, with the same
result up to the method's own rounding; a stage's floor is the fastest of them (bench/service.py times
them). Pillow and numpy only, as the service.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from calibration.segmentation import resize_nearest
from service.imaging import mask_scanlines
from service.inference import ServedModel

Call = Callable[[], object]


def _rgb(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def plain_pipeline(model: ServedModel, data: bytes) -> bytes:
    """The do-it-yourself script: Pillow decode at full size, bilinear resize to the model's input,
    normalise, onnxruntime, argmax on the logit grid, nearest resize to the image, palette PNG (zlib
    level 1, Pillow's fastest useful setting: a fairer rival than its default 6). No avoidable copy
    either (no convert() of an RGB image)."""
    image = _rgb(data)
    width, height = image.size
    h, w = model.input_size(height, width)
    small = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)  # (h, w, 3)
    spec = model.bundle.manifest.input
    x = (small / spec.pixel_scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    logits = model.run(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))[0]  # (C, h', w')
    mask = Image.fromarray(logits.argmax(axis=0).astype(np.uint8), "L")
    full = mask.resize((width, height), Image.Resampling.NEAREST)
    full.putpalette(model.palette)
    buffer = io.BytesIO()
    full.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_ways(data: bytes, size: tuple[int, int]) -> dict[str, Call]:
    """Bytes -> (h, w, 3) uint8 at ``size``: every way Pillow offers to get there."""
    height, width = size

    def full() -> object:
        image = _rgb(data)
        return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))

    def reduced() -> object:
        # Integer box reduction first (cheap), then the small bilinear resize.
        image = _rgb(data)
        k = max(1, min(image.size[0] // width, image.size[1] // height))
        return np.asarray(image.reduce(k).resize((width, height), Image.Resampling.BILINEAR))

    def gap() -> object:
        image = _rgb(data)
        return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0))

    ways: dict[str, Call] = {"full decode + resize": full, "+ reduce(k)": reduced, "reducing_gap 2": gap}
    if Image.open(io.BytesIO(data)).format == "JPEG":

        def draft() -> object:
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (width, height))  # libjpeg DCT scaling
            return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))

        ways["DCT-scaled decode"] = draft
    return ways


def upsample_ways(decision: np.ndarray, size: tuple[int, int]) -> dict[str, Call]:
    """(h, w) -> (H, W) nearest: the gather of calibration.segmentation, and np.repeat when it is exact."""
    height, width = size
    ways: dict[str, Call] = {"index gather": lambda: resize_nearest(decision, height, width)}
    h, w = decision.shape
    if height % h == 0 and width % w == 0:
        ways["np.repeat"] = lambda: np.repeat(np.repeat(decision, height // h, 0), width // w, 1)
    return ways


def encode_ways(mask: np.ndarray, palette: bytes) -> dict[str, Call]:
    """(H, W) mask -> palette PNG bytes (or just its compressed pixels, the part that costs)."""

    def pillow() -> object:
        image = Image.fromarray(mask, "L")
        image.putpalette(palette)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    lines = mask_scanlines(mask)

    def zlib_rle() -> object:
        deflate = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
        return deflate.compress(lines.data) + deflate.flush()

    return {"Pillow PNG level 1": pillow, "zlib level 1 RLE, pixels only": zlib_rle}
