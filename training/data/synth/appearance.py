"""The look of a domain: sky, per-class textures, lighting, colour grading and sensor artefacts.

Everything is vectorised over the image; the per-class amplitudes are looked up through the label map, so
texture follows object boundaries like real materials do.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from calibration.classes import NUM_CLASSES, TRAIN_ID
from training.data.synth.config import DomainStyle


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """(H, W) float32 smooth noise with unit-ish std and features about `cell` pixels wide."""
    gh, gw = int(np.ceil(height / cell)) + 2, int(np.ceil(width / cell)) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = Image.fromarray(grid, mode="F").resize((int(gw * cell), int(gh * cell)), Image.Resampling.BILINEAR)
    oy, ox = int(rng.integers(0, max(1, int(cell)))), int(rng.integers(0, max(1, int(cell))))
    return np.asarray(big)[oy : oy + height, ox : ox + width]


def sky_gradient(rng: np.random.Generator, height: int, width: int, style: DomainStyle) -> np.ndarray:
    """(H, W, 3) uint8 sky: vertical gradient plus soft clouds."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None] ** 0.8  # (H, 1, 1)
    top = np.asarray(style.sky_top, dtype=np.float32) * float(rng.uniform(0.9, 1.1))
    bottom = np.asarray(style.sky_bottom, dtype=np.float32) * float(rng.uniform(0.95, 1.05))
    sky = top + (bottom - top) * t  # (H, 1, 3)
    clouds = np.clip(value_noise(rng, height, width, width / 6.0) - 0.3, 0.0, None)[..., None]  # (H, W, 1)
    sky = sky + clouds * (235.0 - sky) * float(rng.uniform(0.2, 0.7))
    return np.clip(sky, 0, 255).astype(np.uint8)


def _class_lut(values: tuple[float, ...]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    lut[:NUM_CLASSES] = values
    return lut


_GROUND = np.zeros(256, dtype=np.float32)
_GROUND[[TRAIN_ID["road"], TRAIN_ID["sidewalk"], TRAIN_ID["terrain"]]] = 1.0


def apply_style(
    rng: np.random.Generator, rgb: np.ndarray, labels: np.ndarray, style: DomainStyle
) -> np.ndarray:
    """(H, W, 3) uint8 flat-coloured drawing + (H, W) train ids -> (H, W, 3) uint8 photo-like image."""
    h, w = labels.shape
    img = rgb.astype(np.float32)
    lo = value_noise(rng, h, w, max(4.0, w / 40.0))
    hi = value_noise(rng, h, w, 1.5)
    amp = 1.0 + _class_lut(style.texture)[labels] * lo + _class_lut(style.grain)[labels] * hi  # (H, W)
    # cast shadows: large soft dark patches on the ground
    patches = np.clip(value_noise(rng, h, w, w / 10.0) * 1.5 - 0.5, 0.0, 1.0)
    amp *= 1.0 - style.shadow * patches * _GROUND[labels]
    img *= amp[..., None]

    # lighting and colour grading, jittered per image around the domain's values: gain and tint, then
    # saturation around the grey value, then contrast around mid-grey; all linear, so one 3x3 matrix
    gain = style.brightness * float(rng.uniform(0.9, 1.1))
    tint = np.diag(np.asarray(style.tint, dtype=np.float64) * gain)
    grey = np.full((3, 3), 1.0 / 3.0)
    sat = grey + style.saturation * (np.eye(3) - grey)
    matrix = (tint @ sat.T).T * style.contrast  # applied to row vectors: rgb @ matrix.T
    offset = 128.0 * (1.0 - style.contrast)
    img = img.reshape(-1, 3) @ matrix.T.astype(np.float32) + np.float32(offset)
    img = img.reshape(h, w, 3)
    if style.gamma != 1.0:
        lut = (255.0 * (np.arange(256) / 255.0) ** style.gamma).astype(np.float32)
        img = lut[np.clip(img, 0.0, 255.0).astype(np.uint8)]
    if style.vignette > 0:
        yy = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
        xx = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
        img *= (1.0 - style.vignette * 0.5 * (xx**2 + yy**2))[..., None]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    radius = style.blur * w / 512.0
    if radius > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(out).astype(np.float32)
    if style.noise > 0:
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(style.noise)
    result = np.clip(arr, 0, 255).astype(np.uint8)
    if style.jpeg_quality < 95:
        buf = io.BytesIO()
        Image.fromarray(result).save(buf, format="JPEG", quality=round(style.jpeg_quality))
        buf.seek(0)
        result = np.asarray(Image.open(buf).convert("RGB"))
    return result
