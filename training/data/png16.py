"""Read and write 16-bit PNGs with several channels, which Pillow truncates to 8 bits.

SYNTHIA stores its labels as 16-bit PNGs (class id in the first channel, instance id in the second); Pillow
maps 16-bit RGB to 8-bit RGB by dropping the low byte, which turns every class id into 0. This module decodes
such files with zlib and numpy (rows filtered with None/Sub/Up are reconstructed vectorised; Average and Paeth
need a per-byte loop). Grey 16-bit PNGs are left to Pillow, which reads them exactly.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> channels (palette images are never 16-bit)


class PngError(ValueError):
    pass


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != _SIGNATURE or head[12:16] != b"IHDR":
        raise PngError(f"{path}: expected a PNG file, got {head[:8]!r}")
    width, height, depth, color_type = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, color_type


def _chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
        if kind == b"IEND":
            return out
    raise PngError(f"{path}: expected an IEND chunk, the file is truncated")


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def unfilter(raw: np.ndarray, bpp: int) -> np.ndarray:
    """(H, 1 + stride) uint8 filtered scanlines -> (H, stride) uint8 bytes."""
    h, stride = raw.shape[0], raw.shape[1] - 1
    out = np.empty((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        kind, line = int(raw[y, 0]), raw[y, 1:]
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum along each byte lane, mod 256
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).ravel()
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):
            lb, pb_ = line.tolist(), prev.tolist()
            cb = [0] * stride
            for x in range(stride):
                a = cb[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cb[x] = (lb[x] + ((a + pb_[x]) >> 1)) & 0xFF
                else:
                    c = pb_[x - bpp] if x >= bpp else 0
                    cb[x] = (lb[x] + _paeth(a, pb_[x], c)) & 0xFF
            cur = np.array(cb, dtype=np.uint8)
        else:
            raise PngError(f"row {y}: expected a filter type 0..4, got {kind}")
        out[y] = cur
        prev = out[y]
    return out


def read_png16(path: Path) -> np.ndarray:
    """A 16-bit PNG -> (H, W) or (H, W, C) uint16."""
    path = Path(path)
    data = path.read_bytes()
    width, height, depth, color_type = png_header(path)
    if depth != 16:
        raise PngError(f"{path}: expected a 16-bit PNG, got bit depth {depth}")
    if color_type not in _CHANNELS:
        raise PngError(f"{path}: expected colour type 0, 2, 4 or 6, got {color_type}")
    chunks = _chunks(data, path)
    if chunks[0][1][12] != 0:
        raise PngError(f"{path}: expected a non-interlaced PNG, got Adam7 interlacing")
    channels = _CHANNELS[color_type]
    bpp = 2 * channels
    try:
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    except zlib.error as e:
        raise PngError(f"{path}: corrupt image data ({e})") from e
    if len(raw) != height * (1 + width * bpp):
        raise PngError(f"{path}: expected {height * (1 + width * bpp)} bytes of image data, got {len(raw)}")
    rows = unfilter(np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * bpp), bpp)
    pixels = rows.view(">u2").astype(np.uint16).reshape(height, width, channels)
    return pixels[..., 0] if channels == 1 else pixels


def _filter_rows(rows: np.ndarray, bpp: int, kind: int) -> np.ndarray:
    """(H, stride) uint8 -> (H, stride) filtered with one filter type for every row (vectorised)."""
    x = rows.astype(np.int32)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]
    if kind == 0:
        pred = np.zeros_like(x)
    elif kind == 1:
        pred = a
    elif kind == 2:
        pred = b
    elif kind == 3:
        pred = (a + b) >> 1
    elif kind == 4:
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    else:
        raise ValueError(f"filter_type: expected 0..4, got {kind}")
    return ((x - pred) & 0xFF).astype(np.uint8)


def write_png16(path: Path, array: np.ndarray, filter_type: int = 0) -> None:
    """(H, W) or (H, W, C) integer array (C in 1..4) -> 16-bit PNG, each row filtered with `filter_type`."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    h, w, channels = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = a.astype(">u2").view(np.uint8).reshape(h, w * channels * 2)
    filtered = _filter_rows(rows, 2 * channels, filter_type)
    raw = np.concatenate([np.full((h, 1), filter_type, dtype=np.uint8), filtered], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    Path(path).write_bytes(
        _SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )
