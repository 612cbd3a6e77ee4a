"""Augmentations for self-training: random scale and crop (with DAFormer's cat-max-ratio), flip, colour
jitter, Gaussian blur. Pure functions on numpy arrays with an explicit generator; image and label move
together.

image: (H, W, 3) uint8 RGB; label: (H, W) uint8 train ids (255 = ignore).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from calibration.classes import IGNORE_INDEX

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: Size | None = (256, 256)  # None: no crop
    scale_range: tuple[float, float] = (0.5, 2.0)  # relative to the input size
    cat_max_ratio: float = 0.75  # the largest class may cover at most this share of a crop (1.0: off)
    crop_tries: int = 10
    flip_prob: float = 0.5
    jitter_prob: float = 0.5
    brightness: float = 0.125  # max relative change
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.02  # max shift as a fraction of the colour circle
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"AugmentConfig.scale_range: expected 0 < low <= high, got {self.scale_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(
                f"AugmentConfig.cat_max_ratio: expected a value in (0, 1], got {self.cat_max_ratio}"
            )
        if self.crop_size is not None and min(self.crop_size) < 1:
            raise ValueError(
                f"AugmentConfig.crop_size: expected positive (height, width), got {self.crop_size}"
            )


def resize_pair(image: np.ndarray, label: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, label nearest, to size = (height, width)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    lab = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    return img, lab


def random_scale(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    s = float(rng.uniform(*scale_range))
    h, w = label.shape
    return resize_pair(image, label, (max(1, round(h * s)), max(1, round(w * s))))


def pad_to(image: np.ndarray, label: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right up to at least `size`: image with 0, label with the ignore index."""
    h, w = label.shape
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph == 0 and pw == 0:
        return image, label
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)))
    lab = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return img, lab


def crop_box(
    label: np.ndarray, rng: np.random.Generator, size: Size, cat_max_ratio: float = 1.0, tries: int = 10
) -> tuple[int, int]:
    """Top-left corner of a crop; with cat_max_ratio < 1, retry until no class dominates (mmseg semantics)."""
    h, w = label.shape
    ch, cw = min(size[0], h), min(size[1], w)
    y = x = 0
    for _ in range(max(1, tries)):
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        if cat_max_ratio >= 1.0:
            break
        crop = label[y : y + ch, x : x + cw]
        counts = np.bincount(crop[crop != IGNORE_INDEX].ravel(), minlength=1)
        counts = counts[counts > 0]
        if counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    size: Size,
    cat_max_ratio: float = 1.0,
    tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    image, label = pad_to(image, label, size)
    y, x = crop_box(label, rng, size, cat_max_ratio, tries)
    return image[y : y + size[0], x : x + size[1]], label[y : y + size[0], x : x + size[1]]


def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image[:, ::-1], label[:, ::-1]


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.125,
    contrast: float = 0.25,
    saturation: float = 0.25,
    hue: float = 0.02,
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, each drawn uniformly within ± its amount."""
    img = image.astype(np.float32)
    img *= 1.0 + float(rng.uniform(-brightness, brightness))
    mean = img.mean()
    img = mean + (img - mean) * (1.0 + float(rng.uniform(-contrast, contrast)))
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * (1.0 + float(rng.uniform(-saturation, saturation)))
    out = np.clip(img, 0, 255).astype(np.uint8)
    if hue > 0:
        shift = round(float(rng.uniform(-hue, hue)) * 256)
        if shift:
            hsv = np.asarray(Image.fromarray(out).convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
            out = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    return out


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def augment(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The usual pipeline: scale, crop, flip on both; colour jitter and blur on the image only."""
    image, label = random_scale(image, label, rng, config.scale_range)
    if config.crop_size is not None:
        image, label = random_crop(
            image, label, rng, config.crop_size, config.cat_max_ratio, config.crop_tries
        )
    if rng.uniform() < config.flip_prob:
        image, label = hflip(image, label)
    if rng.uniform() < config.jitter_prob:
        image = color_jitter(image, rng, config.brightness, config.contrast, config.saturation, config.hue)
    if rng.uniform() < config.blur_prob:
        image = gaussian_blur(image, float(rng.uniform(*config.blur_sigma)))
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
