"""Augmentations keep image and label aligned (property tests); crops obey cat_max_ratio."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data.augment import (
    AugmentConfig,
    augment,
    color_jitter,
    crop_box,
    gaussian_blur,
    hflip,
    random_crop,
    random_scale,
)
from calibration.classes import IGNORE_INDEX


def _blocks(seed: int, h: int, w: int, cell: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A label of constant cells and an image whose red channel encodes the label (10 * id)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 19, (h // cell + 1, w // cell + 1), dtype=np.uint8)
    label = np.kron(cells, np.ones((cell, cell), dtype=np.uint8))[:h, :w]
    image = np.stack([label * 10, np.full_like(label, 7), label], axis=-1).astype(np.uint8)
    return image, label


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), ch=st.integers(4, 40), cw=st.integers(4, 40), flip=st.booleans())
def test_crop_and_flip_keep_alignment_exactly(seed, ch, cw, flip):
    image, label = _blocks(seed, 32, 48)
    rng = np.random.default_rng(seed)
    img, lab = random_crop(image, label, rng, (ch, cw))
    if flip:
        img, lab = hflip(img, lab)
    assert img.shape[:2] == lab.shape == (ch, cw)
    valid = lab != IGNORE_INDEX
    assert np.array_equal(img[..., 0][valid], lab[valid] * 10)
    assert np.all(img[..., 1][~valid] == 0)  # padding: zeros in the image, ignore in the label


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lo=st.floats(0.5, 1.0), hi=st.floats(1.0, 2.0))
def test_scale_keeps_alignment_inside_regions(seed, lo, hi):
    image, label = _blocks(seed, 64, 96, cell=16)
    rng = np.random.default_rng(seed)
    img, lab = random_scale(image, label, rng, (lo, hi))
    assert img.shape[:2] == lab.shape
    # away from region boundaries, bilinear image and nearest label agree
    r = 3
    pad = np.pad(lab.astype(np.int16), r, mode="edge")
    same = np.ones(lab.shape, dtype=bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            same &= pad[r + dy : r + dy + lab.shape[0], r + dx : r + dx + lab.shape[1]] == lab
    assert same.mean() > 0.15
    assert np.all(np.abs(img[..., 0][same].astype(int) - lab[same].astype(int) * 10) <= 1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_full_pipeline_keeps_the_label_a_function_of_position(seed):
    image, label = _blocks(seed, 64, 96, cell=16)
    config = AugmentConfig(crop_size=(32, 48), jitter_prob=1.0, blur_prob=1.0, blur_sigma=(0.5, 1.0))
    img, lab = augment(image, label, np.random.default_rng(seed), config)
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8 and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= set(np.unique(label)) | {IGNORE_INDEX}
    # photometric changes must not touch the label: replay without them gives the same label
    plain = AugmentConfig(crop_size=(32, 48), jitter_prob=1.0, blur_prob=1.0, blur_sigma=(0.5, 1.0), hue=0.0)
    _, lab2 = augment(image, label, np.random.default_rng(seed), plain)
    assert np.array_equal(lab, lab2)


def test_cat_max_ratio_avoids_dominated_crops():
    label = np.zeros((100, 100), dtype=np.uint8)
    label[:, 90:] = 5  # one small region of another class on the right
    hits_plain = hits_cat = 0
    for seed in range(40):
        y, x = crop_box(label, np.random.default_rng(seed), (20, 20), cat_max_ratio=1.0)
        hits_plain += np.any(label[y : y + 20, x : x + 20] == 5)
        y, x = crop_box(label, np.random.default_rng(seed), (20, 20), cat_max_ratio=0.9, tries=50)
        crop = label[y : y + 20, x : x + 20]
        hits_cat += np.any(crop == 5)
    assert hits_cat > hits_plain
    assert hits_cat == 40


def test_color_jitter_and_blur_are_deterministic_and_bounded():
    image, _ = _blocks(0, 32, 32)
    a = color_jitter(image, np.random.default_rng(1))
    b = color_jitter(image, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == image.shape
    assert np.array_equal(color_jitter(image, np.random.default_rng(1), 0, 0, 0, 0), image)
    blurred = gaussian_blur(image, 1.5)
    assert blurred.shape == image.shape and blurred.std() < image.std()
    assert gaussian_blur(image, 0) is image


def test_config_validation():
    with pytest.raises(ValueError, match=r"scale_range: expected 0 < low <= high, got \(2.0, 1.0\)"):
        AugmentConfig(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        AugmentConfig(cat_max_ratio=0.0)
