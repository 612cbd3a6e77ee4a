"""Pixels in and out: decode uploads, build the model's input tensor, resize and encode masks.

Pure functions over bytes and arrays; the routes decide what a failure means over HTTP.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The nearest resize of decisions lives in the core's pipeline (shared with `blda evaluate`); re-exported.
from calibration.segmentation import nearest_indices as nearest_indices
from calibration.segmentation import resize_nearest as resize_nearest
from service.deflate import compress_rows

# Formats Pillow may try: nothing else is parsed, whatever the bytes claim to be.
DECODERS = ("PNG", "JPEG", "WEBP")
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable PNG, JPEG or WebP image."""


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed (found before decoding)."""


# EXIF orientations (TIFF tag 0x0112) that turn the stored image by 90 degrees: its sides swap.
_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)


@contextmanager
def _decoding() -> Iterator[None]:
    """Pillow's failures as our two errors: too large (a bomb) or not an image."""
    try:
        with warnings.catch_warnings():
            # Our own limit applies (open_image); Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"expected at most the allowed pixels, got {exc}") from exc
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


@dataclass(frozen=True)
class OpenedImage:
    """An image whose header is read and checked, its pixels not yet decoded."""

    image: Image.Image  # lazy
    size: tuple[int, int]  # (H, W) upright, as displayed (EXIF orientation applied)
    swaps_sides: bool  # the stored image is (W, H): its EXIF orientation turns it by 90 degrees


def open_image(data: bytes, max_pixels: int) -> OpenedImage:
    """Bytes -> the lazily opened image and its upright size; the size is checked from the header."""
    if not data:
        raise ImageDecodeError("expected image bytes, got an empty body")
    with _decoding():
        opened = Image.open(io.BytesIO(data), formats=DECODERS)  # lazy: reads the header only
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"expected a positive image size, got {width} x {height}")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"expected at most {max_pixels} pixels, got {width} x {height} = {width * height}"
            )
        swaps = opened.getexif().get(_ORIENTATION, 1) in _SWAPS_SIDES
        size = (width, height) if swaps else (height, width)
        return OpenedImage(opened, size, swaps)


def scaled_decode_size(image_size: tuple[int, int], at_least: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) to ask a scaling decoder for, or None for a full decode: only when ``at_least`` is at
    most half the image on both sides (a smaller reduction saves little and would blur more)."""
    height, width = image_size
    if 2 * at_least[0] > height or 2 * at_least[1] > width:
        return None
    return at_least


def _upright(opened: OpenedImage, at_least: tuple[int, int] | None) -> Image.Image:
    """The decoded RGB image, upright; with ``at_least`` (h, w) maybe reduced (see :func:`load_rgb`)."""
    image = opened.image
    with _decoding():
        wanted = scaled_decode_size(opened.size, at_least) if at_least is not None else None
        if wanted is not None and image.format == "JPEG":
            h, w = (wanted[1], wanted[0]) if opened.swaps_sides else wanted
            image.draft("RGB", (w, h))  # the decoder picks the largest 1/2^k scale keeping >= (w, h)
        image.load()
        # In place: a copy of the whole image when there is nothing to turn, otherwise.
        ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else _to_rgb(image)


def load_rgb(opened: OpenedImage, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels, upright: (H, W, 3) uint8, or with ``at_least`` (h, w) and a decoder that can scale
    (JPEG: libjpeg's DCT scaling by 1/2, 1/4, 1/8), the smallest such reduction of at least (h, w).

    Pillow 13 offers scaled decoding for JPEG only (WebP and PNG decode at full size whatever is asked).
    """
    return np.asarray(_upright(opened, at_least))  # (H, W, 3) uint8


def load_resized(opened: OpenedImage, size: tuple[int, int], scaled: bool = True) -> np.ndarray:
    """The pixels upright at ``size`` (h, w): (h, w, 3) uint8, decoded at reduced scale first when
    ``scaled`` and the decoder can (see :func:`load_rgb`), then resized as :func:`resize_rgb` does.

    The same pixels as ``resize_rgb(load_rgb(opened, ...), size)``, with the image kept in Pillow until
    it is small: no full-size copies into numpy and back.
    """
    return np.asarray(_resized(_upright(opened, size if scaled else None), size))  # (h, w, 3)


def decode_image(data: bytes, max_pixels: int, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, upright per EXIF; the size is checked from the header first.
    With ``at_least``, maybe smaller (see :func:`load_rgb`)."""
    return load_rgb(open_image(data, max_pixels), at_least)


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


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 at ``size`` (bilinear, Pillow's: antialiased when shrinking)."""
    if rgb.shape[:2] == size:
        return rgb
    return np.asarray(_resized(Image.fromarray(rgb, "RGB"), size))


def normalise(rgb: np.ndarray, norm: Normalisation) -> np.ndarray:
    """(h, w, 3) uint8 -> (1, 3, h, w) float32, normalised."""
    height, width = rgb.shape[:2]
    out = np.empty((1, 3, height, width), dtype=np.float32)
    for channel in range(3):
        # Writing each plane in place avoids a (H, W, 3) float temporary and a transpose copy.
        np.multiply(rgb[:, :, channel], norm.scale[channel], out=out[0, channel], casting="unsafe")
        out[0, channel] += norm.offset[channel]
    return out


def preprocess(rgb: np.ndarray, size: tuple[int, int], norm: Normalisation) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 at ``size`` (bilinear), normalised."""
    return normalise(resize_rgb(rgb, size), norm)


def palette_bytes(colors: np.ndarray) -> bytes:
    """(C, 3) uint8 -> a 768-byte PNG palette (unused entries black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(colors)] = colors
    return table.tobytes()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Rows that repeat the row before, as a share of all rows, from which constant repeat blocks beat one zlib
# pass (measured: a 4x upsampled mask, 75%, encodes ~2x faster; at 2x, 50%, the per-row flushes and
# Python steps cost more than zlib's search saves).
REPEATS_WORTH_IT = 0.6


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def mask_scanlines(mask: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """(h, w) uint8 -> (H, W + 1) PNG scanlines (filter byte 0, "None", then the row) of the mask resized
    to ``size`` (H, W) by nearest neighbour (pixel centres, as :func:`resize_nearest`).

    The resize is an index gather fused into building the scanlines: columns first on the h source rows
    (into rows that already carry their filter byte), then whole rows repeated, so the (H, W) mask is never
    made on its own.
    """
    h, w = mask.shape
    height, width = size if size is not None else (h, w)
    lines = np.empty((h, width + 1), np.uint8)
    lines[:, 0] = 0
    lines[:, 1:] = mask if width == w else mask[:, nearest_indices(w, width)]
    return lines if height == h else lines[nearest_indices(h, height)]


def encode_png_mask(
    mask: np.ndarray, palette: bytes, compress_level: int = 1, size: tuple[int, int] | None = None
) -> bytes:
    """(h, w) uint8 class ids -> palette PNG (8-bit, pixel value = class id), resized to ``size`` (H, W)
    by nearest neighbour when given.

    Written here rather than by Pillow: no row filter, zlib's run-length strategy (a mask is long runs
    of one value) on the distinct rows only, and each row equal to the one before (every repeat of an
    upsampled row, and equal neighbours) a constant back-reference block (service.deflate) when most
    rows repeat: ~3x faster than Pillow's palette PNG at level 1 for a 1024 x 2048 mask upsampled 4x.
    """
    h = mask.shape[0]
    height, width = size if size is not None else mask.shape
    lines = mask_scanlines(mask, (h, width))  # (h, W + 1): the source rows, columns resized
    row_src = nearest_indices(h, height)  # (H,) the source row of each PNG row
    same = np.zeros(h, bool)  # same[r]: source row r equals row r - 1
    same[1:] = (lines[1:] == lines[:-1]).all(axis=1)
    step = np.diff(row_src)
    repeats = np.concatenate(([False], (step == 0) | ((step == 1) & same[row_src[1:]])))  # (H,)
    if repeats.mean() >= REPEATS_WORTH_IT:
        row_bytes = [lines[r].tobytes() for r in range(h)]
        pixels = compress_rows([row_bytes[r] for r in row_src], repeats.tolist(), compress_level)
    else:
        deflate = zlib.compressobj(compress_level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
        pixels = deflate.compress(lines[row_src].data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette, no interlace
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", palette),
            _png_chunk(b"IDAT", pixels),
            _png_chunk(b"IEND", b""),
        )
    )


def run_length_encode(mask: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) -> (values, lengths) of the runs of the row-major flattened mask, resized first to ``size``
    (H, W) by nearest neighbour (as :func:`resize_nearest`) when given, without making the resized mask.

    The format of the JSON masks: expand with ``np.repeat(values, lengths).reshape(H, W)``. Resized, a
    row is its source row with each column repeated, and rows repeat: the runs of each source row are
    found once on the (h, w') distinct columns, laid out per output row, and merged where a row ends in
    the value the next one starts with.
    """
    h, w = mask.shape
    height, width = size if size is not None else (h, w)
    if height * width == 0:
        return mask.ravel()[:0], np.zeros(0, dtype=np.int64)
    col_src, col_reps = np.unique(nearest_indices(w, width), return_counts=True)  # (w',) each
    row_src = nearest_indices(h, height)  # (H,) the source row of each output row
    cells = mask[:, col_src]  # (h, w') distinct columns; cell j stands for col_reps[j] pixels
    # Runs within each source row: a run starts at column 0 and wherever the value changes.
    starts = np.ones(cells.shape, bool)
    starts[:, 1:] = cells[:, 1:] != cells[:, :-1]
    flat_starts = np.flatnonzero(starts)  # (R,) over the (h, w') cells, row by row
    run_values = cells.ravel()[flat_starts]
    run_lengths = np.add.reduceat(np.tile(col_reps, h), flat_starts)  # (R,)
    per_row = starts.sum(axis=1)  # (h,) runs in each source row
    first = np.concatenate(([0], np.cumsum(per_row)[:-1]))  # (h,) index of each row's first run
    # The runs of every output row, in order: row i contributes runs first[r] .. first[r] + per_row[r].
    counts = per_row[row_src]  # (H,)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    index = np.repeat(first[row_src], counts) + offsets
    values, lengths = run_values[index], run_lengths[index]
    # Merge runs that continue across a row boundary (equal neighbouring values).
    keep = np.ones(values.size, bool)
    keep[1:] = values[1:] != values[:-1]
    merged = np.flatnonzero(keep)
    return values[merged], np.add.reduceat(lengths, merged)


def resize_weights(shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (h, w) int64: how many pixels of the nearest resize to ``size`` (H, W) each source pixel
    becomes (0 for pixels a shrink skips); pixel counts of the resized mask without making it."""
    (h, w), (height, width) = shape, size
    rows = np.bincount(nearest_indices(h, height), minlength=h)  # (h,)
    cols = np.bincount(nearest_indices(w, width), minlength=w)  # (w,)
    return rows[:, None] * cols[None, :]


def class_counts(mask: np.ndarray, num_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(H, W) -> (C,) int64 pixel count per class; each pixel counting ``weights`` (H, W) when given."""
    flat_weights = weights.ravel() if weights is not None else None
    counts = np.bincount(mask.ravel(), weights=flat_weights, minlength=num_classes)[:num_classes]
    return counts.astype(np.int64)
