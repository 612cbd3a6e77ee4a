"""Pixels in and out: decode uploads, build the model's input tensor, resize and encode masks.

Pure functions over bytes and arrays; the routes decide what a failure means over HTTP.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The nearest resize of decisions lives in the core's pipeline (shared with `blda evaluate`); re-exported.
from calibration.segmentation import nearest_indices as nearest_indices
from calibration.segmentation import resize_nearest as resize_nearest

# Formats Pillow may try: nothing else is parsed, whatever the bytes claim to be.
DECODERS = ("PNG", "JPEG", "WEBP")
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable PNG, JPEG or WebP image."""


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed (found before decoding)."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, upright per EXIF; the size is checked from the header first."""
    if not data:
        raise ImageDecodeError("expected image bytes, got an empty body")
    try:
        with warnings.catch_warnings():
            # Our own limit applies below; Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=DECODERS)  # lazy: reads the header only
            width, height = opened.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"expected a positive image size, got {width} x {height}")
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"expected at most {max_pixels} pixels, got {width} x {height} = {width * height}"
                )
            image = ImageOps.exif_transpose(opened)  # decodes
            if image.mode != "RGB":
                image = _to_rgb(image)
            return np.asarray(image)  # (H, W, 3) uint8
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"expected at most {max_pixels} pixels, got {exc}") from exc
    except (ImageDecodeError, ImageTooLargeError):
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "expected a PNG, JPEG or WebP image, got bytes of none of these formats"
        ) from exc
    except Exception as exc:
        # Pillow's decoders report malformed input through many exception types (OSError, SyntaxError,
        # struct.error, ValueError, ...): all of them mean the client's bytes are not a valid image.
        raise ImageDecodeError(f"expected a PNG, JPEG or WebP image, got undecodable bytes ({exc})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float greyscale: scale to 8 bits rather than clipping.
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0.0
        scaled = (values * (255.0 / top) if top > 0 else values).clip(0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def model_input_size(
    height: int, width: int, size: tuple[int, int] | None, multiple_of: int
) -> tuple[int, int]:
    """(H, W) fed to the network: the manifest's fixed size, else the image's own rounded to the stride."""
    if size is not None:
        return size

    def round_side(side: int) -> int:
        # Halves round up (Python's round() would send them to the even multiple).
        return max(multiple_of, (side + multiple_of // 2) // multiple_of * multiple_of)

    return round_side(height), round_side(width)


@dataclass(frozen=True)
class Normalisation:
    """``(x / pixel_scale - mean) / std`` folded into one multiply-add per channel."""

    scale: np.ndarray  # (3,) float32
    offset: np.ndarray  # (3,) float32

    @classmethod
    def from_spec(
        cls, mean: tuple[float, float, float], std: tuple[float, float, float], pixel_scale: float
    ) -> Normalisation:
        mean_a = np.asarray(mean, dtype=np.float64)
        std_a = np.asarray(std, dtype=np.float64)
        return cls(
            scale=(1.0 / (pixel_scale * std_a)).astype(np.float32),
            offset=(-mean_a / std_a).astype(np.float32),
        )


def preprocess(rgb: np.ndarray, size: tuple[int, int], norm: Normalisation) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 at ``size`` (bilinear), normalised."""
    height, width = size
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((width, height), Image.Resampling.BILINEAR))
    out = np.empty((1, 3, height, width), dtype=np.float32)
    for channel in range(3):
        # Writing each plane in place avoids a (H, W, 3) float temporary and a transpose copy.
        np.multiply(rgb[:, :, channel], norm.scale[channel], out=out[0, channel], casting="unsafe")
        out[0, channel] += norm.offset[channel]
    return out


def palette_bytes(colors: np.ndarray) -> bytes:
    """(C, 3) uint8 -> a 768-byte PNG palette (unused entries black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(colors)] = colors
    return table.tobytes()


def encode_png_mask(mask: np.ndarray, palette: bytes, compress_level: int = 1) -> bytes:
    """(H, W) uint8 class ids -> palette PNG whose pixel values are the class ids."""
    image = Image.fromarray(mask, "L")
    image.putpalette(palette)  # L -> P keeps the values: each pixel's value is its class id
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def run_length_encode(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) -> (values, lengths) of the runs of the row-major flattened mask.

    The format of the JSON masks: expand with ``np.repeat(values, lengths).reshape(H, W)``.
    """
    flat = mask.ravel()
    if flat.size == 0:
        return flat[:0], np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], starts))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return flat[starts], lengths


def class_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) -> (C,) int64 pixel count per class."""
    return np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
