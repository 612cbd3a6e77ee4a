"""The zlib stream with hand-written repeat blocks: zlib itself must inflate it to the rows, checksum and all."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.deflate import compress_rows, match_lengths, repeat_block
from service.imaging import REPEATS_WORTH_IT, encode_png_mask, mask_scanlines, palette_bytes


def rows_of(
    rng: np.random.Generator, count: int, length: int, p_repeat: float
) -> tuple[list[bytes], list[bool]]:
    rows: list[bytes] = []
    repeats: list[bool] = []
    for i in range(count):
        if i and rng.random() < p_repeat:
            rows.append(rows[-1])
            repeats.append(True)
        else:
            rows.append(rng.choice(np.array([0, 0, 0, 3, 7], np.uint8), length).tobytes())
            repeats.append(False)
    return rows, repeats


# Lengths around the 258-byte match limit, the 3-byte minimum of the last piece, and the 32 KiB window.
@pytest.mark.parametrize("length", [3, 4, 10, 257, 258, 259, 260, 261, 516, 517, 2049, 4097, 32768])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_repeats_inflate_to_the_rows(length: int, level: int) -> None:
    rows, repeats = rows_of(np.random.default_rng(length + level), 9, length, 0.6)
    assert any(repeats)
    assert zlib.decompress(compress_rows(rows, repeats, level)) == b"".join(rows)  # the Adler-32 too


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 700),
    count=st.integers(1, 12),
    p_repeat=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_rows_and_repeats_round_trip(length: int, count: int, p_repeat: float, seed: int) -> None:
    rows, repeats = rows_of(np.random.default_rng(seed), count, length, p_repeat)
    assert zlib.decompress(compress_rows(rows, repeats, 1)) == b"".join(rows)


def test_rows_beyond_the_window_go_to_zlib_whole() -> None:
    rows, repeats = rows_of(np.random.default_rng(1), 3, 32769, 1.0)
    assert zlib.decompress(compress_rows(rows, repeats, 1)) == b"".join(rows)
    with pytest.raises(ValueError, match=r"expected a row of 3\.\.32768 bytes"):
        repeat_block(32769)


def test_match_lengths_cover_the_row_in_legal_pieces() -> None:
    for length in range(3, 1200):
        pieces = match_lengths(length)
        assert sum(pieces) == length and all(3 <= p <= 258 for p in pieces)


def test_a_repeated_row_costs_a_few_bytes() -> None:
    rows, repeats = rows_of(np.random.default_rng(2), 1, 2049, 0.0)
    once = compress_rows(rows, repeats, 1)
    many = compress_rows(rows * 200, [False] + [True] * 199, 1)
    assert len(many) - len(once) < 200 * 40


def test_png_mask_upsampled_4x_takes_the_repeat_path_and_is_exact() -> None:
    rng = np.random.default_rng(3)
    mask = np.repeat(rng.integers(0, 19, (16, 8)).astype(np.uint8), 4, axis=1)  # runs, as masks have
    size = (64, 100)  # rows 4x: 75% of them repeat the row before
    data = encode_png_mask(mask, palette_bytes(np.zeros((19, 3), np.uint8)), 1, size)
    assert REPEATS_WORTH_IT <= 0.75
    # The IDAT stream is the scanlines of the resized mask, checked by zlib itself (Adler-32).
    length = struct.unpack(">I", data[33 + 12 + 768 : 33 + 12 + 768 + 4])[0]
    idat = data[33 + 12 + 768 + 8 : 33 + 12 + 768 + 8 + length]
    assert zlib.decompress(idat) == mask_scanlines(mask, size).tobytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert np.array_equal(np.asarray(image), mask_scanlines(mask, size)[:, 1:])
