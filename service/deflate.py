"""A zlib stream of rows in which many rows repeat the row before: what an upsampled mask's PNG rows are.

A mask resized 4x by nearest neighbour has each row four times. zlib would search every copy again; here
the distinct rows are compressed by zlib (flushed to a byte boundary before each repeat), and each repeat
is one hand-written fixed-Huffman deflate block of back-references to the row before (RFC 1951
§3.2.5-3.2.6), the same bytes for every repeat of a row length. Pure
functions, stdlib only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache

# RFC 1951 §3.2.5: length codes 257.. and distance codes 0.. by their base value and extra bits.
_LENGTH_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
                131, 163, 195, 227, 258)  # fmt: skip
_LENGTH_EXTRA = (0,) * 8 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 4 + (5,) * 4 + (0,)
_DISTANCE_BASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
                  1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577)  # fmt: skip
_DISTANCE_EXTRA = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
                   12, 13, 13)  # fmt: skip
MAX_MATCH = 258
MIN_MATCH = 3
WINDOW = 32768  # the farthest a back-reference reaches (a 32 KiB window, zlib header 0x78)
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no dictionary, fastest-level flag


class _Bits:
    """Deflate's bit order: values least significant bit first, Huffman codes most significant first."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def put(self, value: int, bits: int) -> None:
        self.value |= value << self.count
        self.count += bits

    def code(self, code: int, bits: int) -> None:
        self.put(int(f"{code:0{bits}b}"[::-1], 2), bits)

    def to_bytes(self) -> bytes:
        """Padded with zero bits to a whole byte."""
        return self.value.to_bytes((self.count + 7) // 8, "little")


def _fixed_literal(bits: _Bits, symbol: int) -> None:
    """A literal/length symbol (0..287) in the fixed Huffman code (RFC 1951 §3.2.6)."""
    if symbol < 144:
        bits.code(0x30 + symbol, 8)
    elif symbol < 256:
        bits.code(0x190 + symbol - 144, 9)
    elif symbol < 280:
        bits.code(symbol - 256, 7)
    else:
        bits.code(0xC0 + symbol - 280, 8)


def _code_of(value: int, bases: Sequence[int]) -> int:
    return max(i for i, base in enumerate(bases) if base <= value)


def match_lengths(length: int) -> list[int]:
    """``length`` (>= 3) as deflate match lengths, each in [3, 258]."""
    if length < MIN_MATCH:
        raise ValueError(f"expected a match of at least {MIN_MATCH} bytes, got {length}")
    pieces = []
    while length > MAX_MATCH:
        take = MAX_MATCH if length - MAX_MATCH >= MIN_MATCH else length - MIN_MATCH
        pieces.append(take)
        length -= take
    return [*pieces, length]


@lru_cache(maxsize=64)
def repeat_block(row_bytes: int) -> bytes:
    """Whole bytes of deflate blocks (not final) that repeat the last ``row_bytes`` bytes once: one
    fixed-Huffman block of back-references at distance ``row_bytes``, then an empty stored block that
    ends on a byte boundary (as zlib's flushes do)."""
    if not MIN_MATCH <= row_bytes <= WINDOW:
        raise ValueError(f"expected a row of {MIN_MATCH}..{WINDOW} bytes to repeat, got {row_bytes}")
    bits = _Bits()
    bits.put(0, 1)  # BFINAL = 0
    bits.put(1, 2)  # BTYPE = 01, fixed Huffman codes
    d = _code_of(row_bytes, _DISTANCE_BASE)
    for length in match_lengths(row_bytes):
        code = _code_of(length, _LENGTH_BASE)
        _fixed_literal(bits, 257 + code)
        bits.put(length - _LENGTH_BASE[code], _LENGTH_EXTRA[code])
        bits.code(d, 5)  # fixed distance codes are 5 bits
        bits.put(row_bytes - _DISTANCE_BASE[d], _DISTANCE_EXTRA[d])
    _fixed_literal(bits, 256)  # end of block
    bits.put(0, 1)  # BFINAL = 0
    bits.put(0, 2)  # BTYPE = 00, stored; then LEN = 0, NLEN = ~0 from the next byte boundary
    return bits.to_bytes() + b"\x00\x00\xff\xff"


def compress_rows(rows: Sequence[bytes], repeats: Sequence[bool], level: int) -> bytes:
    """A zlib stream of the concatenated ``rows``, all of one length; ``repeats[i]`` says that row i
    equals row i - 1 (never true for row 0), which then costs a constant block instead of zlib's search.

    Rows too short or too long for a back-reference (< 3 or > 32768 bytes) are all given to zlib.
    """
    if len(rows) != len(repeats) or (repeats and repeats[0]):
        raise ValueError("expected one repeat flag per row, row 0 not a repeat")
    n = len(rows[0]) if rows else 0
    if not MIN_MATCH <= n <= WINDOW:
        return zlib.compress(b"".join(rows), level)
    block = repeat_block(n)
    # Raw deflate with zlib's run-length strategy: its only back-references are at distance 1, to the
    # byte before, which is the same byte in zlib's view and in the stream with the repeats inserted
    # (a repeat ends as the row it repeats). So a sync flush (byte alignment) suffices before a repeat;
    # a full flush would also clear zlib's hash tables, a large memset per row.
    deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
    parts = [_ZLIB_HEADER]
    adler = zlib.adler32(b"")
    pending = False  # rows given to zlib since the last flush
    for row, repeat in zip(rows, repeats, strict=True):
        if repeat:
            if pending:
                parts.append(deflate.flush(zlib.Z_SYNC_FLUSH))
                pending = False
            parts.append(block)
        else:
            parts.append(deflate.compress(row))
            pending = True
        adler = zlib.adler32(row, adler)  # a C loop over the row: cheaper than combining in Python
    parts.append(deflate.flush(zlib.Z_FINISH))
    parts.append(adler.to_bytes(4, "big"))
    return b"".join(parts)
