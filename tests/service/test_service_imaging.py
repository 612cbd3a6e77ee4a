"""Pure image functions against slow references and round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from service_helpers import encode, png_bytes, png_header_only, scene

from service.imaging import (
    ImageDecodeError,
    ImageTooLargeError,
    Normalisation,
    class_counts,
    decode_image,
    encode_png_mask,
    load_resized,
    load_rgb,
    mask_scanlines,
    model_input_size,
    open_image,
    palette_bytes,
    preprocess,
    resize_nearest,
    resize_rgb,
    resize_weights,
    run_length_encode,
    scaled_decode_size,
)

RGB = scene(40, 60, seed=3)


def test_decode_png_rgb_is_lossless() -> None:
    assert np.array_equal(decode_image(png_bytes(RGB), 10**6), RGB)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("L", lambda img: np.repeat(np.asarray(img)[..., None], 3, axis=-1)),
        ("RGBA", lambda img: np.asarray(img)[..., :3]),
        ("P", lambda img: np.asarray(img.convert("RGB"))),
    ],
)
def test_decode_converts_modes_to_rgb(mode: str, expected: object) -> None:
    image = Image.fromarray(RGB).convert(mode)
    decoded = decode_image(encode(image, "PNG"), 10**6)
    assert decoded.shape == (40, 60, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, expected(image))  # type: ignore[operator]


def test_decode_sixteen_bit_greyscale_scales_to_eight_bits() -> None:
    values = (np.arange(40 * 60).reshape(40, 60) * 16).astype(np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"), 10**6)
    assert decoded.shape == (40, 60, 3)
    assert decoded[..., 0].max() == 255 and decoded[0, 0, 0] == 0
    assert np.all(np.diff(decoded[..., 0].ravel().astype(int)) >= 0)  # monotone: no wrap-around


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_decode_lossy_formats(fmt: str) -> None:
    decoded = decode_image(encode(Image.fromarray(RGB), fmt, quality=95), 10**6)
    assert decoded.shape == (40, 60, 3)
    assert np.abs(decoded.astype(int) - RGB.astype(int)).mean() < 12


def test_decode_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(Image.fromarray(RGB), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, 10**6)
    assert decoded.shape == (60, 40, 3)
    expected = np.rot90(RGB, k=-1)
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 12


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage, not an image",
        png_bytes(RGB)[:100],  # truncated inside the pixel data
        png_bytes(RGB)[:30],  # truncated inside the header
        b"GIF89a" + bytes(100),  # a format we do not decode
        encode(Image.fromarray(RGB), "BMP"),
        encode(Image.fromarray(RGB), "JPEG")[:-200],
    ],
)
def test_undecodable_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="expected"):
        decode_image(data, 10**6)


def test_pixel_limit_is_checked_from_the_header() -> None:
    # Under Pillow's own bomb limit but over ours: only a header, so a decode would fail differently.
    with pytest.raises(ImageTooLargeError, match="expected at most 1000000 pixels, got 5000 x 4000"):
        decode_image(png_header_only(5000, 4000), 10**6)
    # Far past Pillow's limit too (Pillow raises its bomb error while opening).
    with pytest.raises(ImageTooLargeError):
        decode_image(png_header_only(100_000, 100_000), 10**6)
    with pytest.raises(ImageDecodeError):
        decode_image(png_header_only(0, 10), 10**6)


def test_model_input_size() -> None:
    assert model_input_size(500, 700, (256, 512), 32) == (256, 512)
    assert model_input_size(500, 700, None, 32) == (512, 704)
    assert model_input_size(5, 7, None, 32) == (32, 32)
    assert model_input_size(48, 80, None, 32) == (64, 96)  # halves round up


def test_preprocess_matches_the_formula() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = Normalisation.from_spec(mean, std, 255.0)
    out = preprocess(RGB, (40, 60), norm)
    reference = (RGB.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)  # (H, W, 3)
    assert out.shape == (1, 3, 40, 60) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], reference.transpose(2, 0, 1), atol=1e-5)
    resized = preprocess(RGB, (32, 48), norm)
    expected = np.asarray(Image.fromarray(RGB).resize((48, 32), Image.Resampling.BILINEAR)).astype(np.float64)
    np.testing.assert_allclose(resized[0], ((expected / 255 - mean) / std).transpose(2, 0, 1), atol=1e-5)


def nearest_reference(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = labels.shape
    out = np.empty((height, width), dtype=labels.dtype)
    for i in range(height):
        for j in range(width):
            # the source pixel whose area contains the output pixel's centre
            out[i, j] = labels[
                min(int((i + 0.5) * h / height), h - 1), min(int((j + 0.5) * w / width), w - 1)
            ]
    return out


@settings(max_examples=40, deadline=None)
@given(
    labels=arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 18)),
    height=st.integers(1, 50),
    width=st.integers(1, 50),
)
def test_resize_nearest_matches_the_slow_loop(labels: np.ndarray, height: int, width: int) -> None:
    assert np.array_equal(resize_nearest(labels, height, width), nearest_reference(labels, height, width))


@settings(max_examples=60, deadline=None)
@given(mask=arrays(np.uint8, st.tuples(st.integers(0, 20), st.integers(0, 20)), elements=st.integers(0, 3)))
def test_run_length_encoding_round_trips(mask: np.ndarray) -> None:
    values, lengths = run_length_encode(mask)
    assert np.array_equal(np.repeat(values, lengths).reshape(mask.shape), mask)
    assert np.all(lengths > 0) and np.all(values[1:] != values[:-1])


def test_png_mask_round_trips_with_palette() -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 19, (33, 47)).astype(np.uint8)
    colors = rng.integers(0, 256, (19, 3)).astype(np.uint8)
    image = Image.open(io.BytesIO(encode_png_mask(mask, palette_bytes(colors), 1)))
    assert image.mode == "P" and image.size == (47, 33)
    assert np.array_equal(np.asarray(image), mask)
    palette = np.array(image.getpalette()[: 19 * 3], dtype=np.uint8).reshape(19, 3)  # type: ignore[index]
    assert np.array_equal(palette, colors)
    assert np.array_equal(class_counts(mask, 19), [(mask == c).sum() for c in range(19)])


BIG = scene(128, 192, seed=5)


def box_reduce(rgb: np.ndarray, k: int) -> np.ndarray:
    """(H, W, 3) -> (H / k, W / k, 3): the mean of each k x k block, what a 1/k DCT scaling approximates."""
    h, w = rgb.shape[0] // k, rgb.shape[1] // k
    return rgb[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))


@pytest.mark.parametrize(("at_least", "factor"), [((16, 24), 8), ((30, 45), 4), ((64, 96), 2), ((65, 96), 1)])
def test_jpeg_decodes_at_the_smallest_scale_at_least_the_asked_size(
    at_least: tuple[int, int], factor: int
) -> None:
    data = encode(Image.fromarray(BIG), "JPEG", quality=95)
    decoded = decode_image(data, 10**6, at_least)
    assert decoded.shape == (128 // factor, 192 // factor, 3)
    # The scaled decode is the image seen at that scale: close to the k x k block means of the full decode.
    full = decode_image(data, 10**6).astype(np.float64)
    assert np.abs(decoded - box_reduce(full, factor)).mean() < 6


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_formats_without_a_scaling_decoder_decode_at_full_size(fmt: str) -> None:
    data = encode(Image.fromarray(BIG), fmt)
    assert decode_image(data, 10**6, (16, 24)).shape == (128, 192, 3)


def test_scaled_decode_follows_the_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the upright image is 192 x 128
    data = encode(Image.fromarray(BIG), "JPEG", quality=95, exif=exif.tobytes())
    opened = open_image(data, 10**6)
    assert opened.size == (192, 128)
    # Half the upright size on each side is asked in upright terms: (96, 64), a 1/2 decode of the stored image.
    decoded = load_rgb(opened, (96, 64))
    assert decoded.shape == (96, 64, 3)
    expected = box_reduce(np.rot90(BIG, k=-1), 2)
    assert np.abs(decoded - expected).mean() < 8


def test_scaled_decode_only_past_half_on_both_sides() -> None:
    assert scaled_decode_size((1024, 2048), (128, 256)) == (128, 256)
    assert scaled_decode_size((256, 512), (128, 256)) == (128, 256)
    assert scaled_decode_size((255, 2048), (128, 256)) is None
    assert scaled_decode_size((1024, 511), (128, 256)) is None


@settings(max_examples=40, deadline=None)
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 18)),
    height=st.integers(1, 50),
    width=st.integers(1, 50),
)
def test_png_mask_at_a_size_is_the_nearest_resize(mask: np.ndarray, height: int, width: int) -> None:
    data = encode_png_mask(mask, palette_bytes(np.zeros((19, 3), np.uint8)), 1, (height, width))
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P" and image.size == (width, height)
    assert np.array_equal(np.asarray(image), nearest_reference(mask, height, width))
    lines = mask_scanlines(mask, (height, width))
    assert np.all(lines[:, 0] == 0) and np.array_equal(lines[:, 1:], nearest_reference(mask, height, width))


@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_mask_is_a_valid_png_with_checksums(level: int) -> None:
    mask = np.repeat(np.arange(19, dtype=np.uint8), 40).reshape(19, 40)
    data = encode_png_mask(mask, palette_bytes(np.zeros((19, 3), np.uint8)), level)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs
    image = Image.open(io.BytesIO(data))
    image.load()  # the zlib stream's own checksum
    assert np.array_equal(np.asarray(image), mask)


def runs_reference(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Runs of the row-major flattened mask, one pixel at a time."""
    values: list[int] = []
    lengths: list[int] = []
    for value in mask.ravel().tolist():
        if values and values[-1] == value:
            lengths[-1] += 1
        else:
            values.append(value)
            lengths.append(1)
    return values, lengths


@settings(max_examples=80, deadline=None)
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 2)),
    height=st.integers(1, 30),
    width=st.integers(1, 30),
)
def test_runs_of_the_resized_mask_without_resizing_it(mask: np.ndarray, height: int, width: int) -> None:
    """Against the runs of the mask resized first (shrinks included, where source pixels are skipped)."""
    full = nearest_reference(mask, height, width)
    values, lengths = run_length_encode(mask, (height, width))
    expected_values, expected_lengths = runs_reference(full)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(lengths, expected_lengths)
    weights = resize_weights(mask.shape, (height, width))
    np.testing.assert_array_equal(class_counts(mask, 3, weights), class_counts(full, 3))


@pytest.mark.parametrize(("fmt", "orientation"), [("PNG", 1), ("JPEG", 1), ("JPEG", 6), ("WEBP", 8)])
@pytest.mark.parametrize("scaled", [False, True])
def test_decoding_to_a_size_is_decoding_then_resizing(fmt: str, orientation: int, scaled: bool) -> None:
    """The image kept in Pillow until it is small: the same pixels as the two steps through numpy."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(BIG), fmt, exif=exif.tobytes())
    size = open_image(data, 10**6).size
    target = (size[0] // 4 - 3, size[1] // 4 + 1)  # not a power-of-two reduction: the resize runs
    expected = resize_rgb(load_rgb(open_image(data, 10**6), target if scaled else None), target)
    got = load_resized(open_image(data, 10**6), target, scaled)
    assert got.shape == (*target, 3)
    np.testing.assert_array_equal(got, expected)
