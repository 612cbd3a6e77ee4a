"""The feedback store (bounds, expiry, one feedback per request) and the mask checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monitoring_helpers import png
from PIL import Image

from calibration.bias import confusion_matrix
from service.feedback import (
    FeedbackError,
    FeedbackStore,
    MaskError,
    ServedPrediction,
    compress_mask,
    decode_mask,
    decompress_mask,
    feedback_confusion,
)
from service.imaging import resize_nearest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prediction(request_id: str, served_at: float, seed: int = 0, calibrated: bool = True) -> ServedPrediction:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 5, (6, 8)).astype(np.uint8)
    cal = np.where(rng.random((6, 8)) < 0.2, (raw + 1) % 5, raw).astype(np.uint8)
    return ServedPrediction(
        request_id=request_id,
        model_name="m",
        model_version="1",
        num_classes=5,
        input_size=(23, 30),
        logit_shape=(6, 8),
        raw=compress_mask(raw),
        calibrated=compress_mask(cal) if calibrated else None,
        served_at=served_at,
    )


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), seed=st.integers(0, 1000))
def test_masks_round_trip_through_compression(h: int, w: int, seed: int) -> None:
    mask = np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)
    np.testing.assert_array_equal(decompress_mask(compress_mask(mask), (h, w)), mask)


def test_store_keeps_at_most_max_entries_oldest_out_first() -> None:
    clock = Clock()
    store = FeedbackStore(max_entries=3, ttl_s=60, clock=clock)
    for i in range(5):
        store.put(prediction(f"r{i}", clock()))
    assert len(store) == 3 and store.evicted == 2
    for gone in ("r0", "r1"):
        with pytest.raises(FeedbackError) as err:
            store.peek(gone)
        assert err.value.reason == "unknown"
    assert store.peek("r4").request_id == "r4"


def test_store_expires_entries_after_the_ttl() -> None:
    clock = Clock()
    store = FeedbackStore(max_entries=10, ttl_s=60, clock=clock)
    store.put(prediction("old", clock()))
    clock.now += 30
    store.put(prediction("new", clock()))
    clock.now += 31  # "old" is 61 s old, "new" 31 s
    with pytest.raises(FeedbackError, match="last 60 s"):
        store.peek("old")
    assert store.peek("new").request_id == "new"
    assert len(store) == 1


def test_feedback_is_taken_once() -> None:
    clock = Clock()
    store = FeedbackStore(max_entries=10, ttl_s=60, clock=clock)
    store.put(prediction("r", clock()))
    assert store.claim("r").request_id == "r"
    for attempt in (store.peek, store.claim):
        with pytest.raises(FeedbackError) as err:
            attempt("r")
        assert err.value.reason == "used"
    assert len(store) == 0  # the masks are dropped once used
    clock.now += 61  # after expiry a used id is forgotten too
    with pytest.raises(FeedbackError) as err:
        store.peek("r")
    assert err.value.reason == "unknown"


def test_store_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        FeedbackStore(max_entries=0)
    with pytest.raises(ValueError, match="ttl_s"):
        FeedbackStore(ttl_s=0)


def test_a_stored_prediction_is_small() -> None:
    store = FeedbackStore()
    smooth = np.repeat(np.arange(8, dtype=np.uint8), 128 * 32).reshape(128, 256)  # (h, w) mask-like
    store.put(
        ServedPrediction(
            "r", "m", "1", 19, (512, 1024), (128, 256), compress_mask(smooth), compress_mask(smooth), 0.0
        )
    )
    assert store.nbytes < smooth.nbytes // 20


def test_decode_mask_accepts_grey_and_palette_pngs() -> None:
    mask = np.random.default_rng(0).integers(0, 5, (23, 30)).astype(np.uint8)
    mask[0, :4] = 255
    np.testing.assert_array_equal(decode_mask(png(mask), (23, 30), 5), mask)
    image = Image.fromarray(mask, "L")
    image.putpalette(bytes(range(256)) * 3)  # mode P: pixel values are the ids, as in served masks
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_mask(buffer.getvalue(), (23, 30), 5), mask)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a png", "expected a PNG image of class ids, got undecodable bytes"),
        (png(np.zeros((10, 30), np.uint8)), "expected 30 x 23 pixels (the size of the served image), got 30 x 10"),
        (png(np.zeros((23, 30, 3), np.uint8)), "expected an 8-bit single-channel PNG (mode L or P) of class ids, got mode RGB"),
        (png(np.full((23, 30), 7, np.uint8)), r"expected class ids 0..4 or 255 (ignore), got [7]"),
    ],
)  # fmt: skip
def test_decode_mask_names_what_was_expected(data: bytes, message: str) -> None:
    with pytest.raises(MaskError) as err:
        decode_mask(data, (23, 30), 5)
    assert message in str(err.value)
    assert str(err.value).startswith("mask: ")


@pytest.mark.parametrize("calibrated", [True, False])
def test_feedback_confusion_is_counted_at_input_resolution(calibrated: bool) -> None:
    served = prediction("r", 0.0, seed=3, calibrated=calibrated)
    truth = np.random.default_rng(4).integers(0, 5, (23, 30)).astype(np.uint8)
    truth[:3] = 255
    conf = feedback_confusion(served, truth)
    raw, cal = served.decisions()
    expected_raw = confusion_matrix(resize_nearest(raw, 23, 30), truth, 5)
    np.testing.assert_array_equal(conf[0], expected_raw)
    assert conf[0].sum() == 20 * 30  # the labelled pixels of the image, not of the logits
    if calibrated:
        assert cal is not None
        np.testing.assert_array_equal(conf[1], confusion_matrix(resize_nearest(cal, 23, 30), truth, 5))
    else:
        assert conf[1].sum() == 0
