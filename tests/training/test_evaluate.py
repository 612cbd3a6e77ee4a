"""Evaluation on tiny fabricated data: metrics equal the ones computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.classes import SUBSETS
from calibration.distributions import fit_pair_gmms
from calibration.tables import build_calibration_tables
from training.data.datasets import Sample
from training.evaluation.evaluate import accumulate_confusions, class_metrics, class_subset, evaluate
from training.evaluation.predictors import upsample_logits
from training.tables import PixelSampler


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The machine is shared: two spinning threads on two busy cores stall far more than one.
    torch.set_num_threads(1)


def one_hot_predictor(num_classes: int):
    """Predicts, at full resolution, the class written in the image's red channel."""

    def predict(images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) -> (N, C, H, W)
        cls = images[..., 0].astype(np.int64)
        return (np.eye(num_classes, dtype=np.float32)[cls] * 5.0).transpose(0, 3, 1, 2)

    return predict


def make_sample(pred: list[list[int]], label: list[list[int]], name: str) -> Sample:
    p = np.asarray(pred, dtype=np.uint8)
    image = np.stack([p, np.zeros_like(p), np.zeros_like(p)], axis=-1)
    return Sample(image, np.asarray(label, dtype=np.uint8), name)


SAMPLES = [
    make_sample([[0, 0, 1], [1, 2, 2]], [[0, 1, 1], [1, 2, 255]], "a"),
    make_sample([[2, 2, 0], [0, 0, 0]], [[2, 0, 0], [0, 0, 1]], "b"),
]
NAMES = ["zero", "one", "two", "three"]


def test_iou_and_bias_by_hand() -> None:
    m = evaluate(one_hot_predictor(4), SAMPLES, NAMES)
    raw = m["raw"]
    # Valid pixels (pred, true): a: (0,0) (0,1) (1,1) (1,1) (2,2); b: (2,2) (2,0) (0,0) (0,0) (0,0) (0,1).
    # class 0: tp 4, predicted 6, true 5 -> IoU 4 / 7; class 1: tp 2, predicted 2, true 4 -> 2 / 4;
    # class 2: tp 2, predicted 3, true 2 -> 2 / 3; class 3 absent everywhere -> undefined.
    assert raw["iou"][:3] == pytest.approx([4 / 7, 2 / 4, 2 / 3])
    assert raw["iou"][3] is None
    ious = np.array([4 / 7, 2 / 4, 2 / 3])
    assert raw["miou"] == pytest.approx(ious.mean())
    assert raw["iou_std"] == pytest.approx(ious.std())
    assert raw["pixel_accuracy"] == pytest.approx(8 / 11)
    # Bias(l) = mean over present true classes c of P(pred = l | y = c) - 1/C:
    # rows: y=0 -> (4/5, 0, 1/5, 0), y=1 -> (2/4, 2/4, 0, 0), y=2 -> (0, 0, 1, 0).
    p = np.array([[4 / 5, 0, 1 / 5, 0], [2 / 4, 2 / 4, 0, 0], [0, 0, 1, 0]])
    assert raw["bias"] == pytest.approx(list(p.mean(0) - 1 / 4))
    assert m["num_images"] == 2
    assert np.asarray(m["confusion_raw"]).sum() == 11


def test_logits_are_upsampled_to_the_label() -> None:
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 1

    def low_res(images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) -> (N, 2, H/4, W/4)
        logits = np.zeros((images.shape[0], 2, 2, 2), np.float32)
        logits[:, 0, :, 0] = 1.0
        logits[:, 1, :, 1] = 1.0
        return logits

    image = np.zeros((8, 8, 3), np.uint8)
    m = evaluate(low_res, [Sample(image, label, "x")], ["left", "right"])
    assert m["raw"]["iou"] == [1.0, 1.0]
    up = upsample_logits(low_res(image[None]), (8, 8))
    assert up.shape == (1, 2, 8, 8)


def test_calibration_at_tau_zero_is_raw_and_tables_are_used() -> None:
    rng = np.random.default_rng(0)
    c = 4
    labels = rng.integers(0, c, (1, 16, 16))
    logits = rng.normal(size=(1, c, 16, 16)) + 3.0 * np.eye(c)[labels].transpose(0, 3, 1, 2)
    pairs, counts = fit_pair_gmms(logits, labels, c, k=2)
    tables = build_calibration_tables(pairs, counts)
    conf = accumulate_confusions(one_hot_predictor(c), SAMPLES, c, tables, taus=(0.0, 0.5))
    np.testing.assert_array_equal(conf.calibrated[0.0], conf.raw)
    assert conf.calibrated[0.5].sum() == conf.raw.sum()
    with pytest.raises(ValueError, match="tables"):
        accumulate_confusions(one_hot_predictor(c), SAMPLES, c, None, taus=(0.2,))


def test_empty_or_mismatched_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        evaluate(one_hot_predictor(4), [], NAMES)
    with pytest.raises(ValueError, match="expected 3 classes"):
        evaluate(one_hot_predictor(4), SAMPLES, NAMES[:3])


def test_class_metrics_without_pixels_has_no_nan() -> None:
    m = class_metrics(np.zeros((3, 3), np.int64))
    assert m["miou"] is None and m["pixel_accuracy"] is None
    assert m["iou"] == [None, None, None]


def test_pixel_sampler_keeps_labels_aligned_and_skips_ignore() -> None:
    logits = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    label = np.arange(20).reshape(4, 5).astype(np.uint8) % 3
    label[0, 0] = 255
    sampler = PixelSampler(pixels_per_image=7, seed=1)
    sampler(logits, label)
    z, y = sampler.arrays()
    assert z.shape == (2, 1, 7) and y.shape == (1, 7)
    flat = logits.reshape(2, -1)
    for i in range(7):
        pix = int(z[0, 0, i])  # channel 0 holds the pixel index
        assert flat[1, pix] == z[1, 0, i]
        assert label.reshape(-1)[pix] == y[0, i] != 255


def test_resizing_predictor_feeds_the_model_the_resized_image() -> None:
    from training.evaluation.predictors import ResizingPredictor

    seen: list[tuple[int, ...]] = []

    def inner(images: np.ndarray) -> np.ndarray:
        seen.append(images.shape)
        return np.zeros((images.shape[0], 2, images.shape[1] // 4, images.shape[2] // 4), np.float32)

    images = np.zeros((1, 32, 64, 3), np.uint8)
    ResizingPredictor(inner, scale=0.5)(images)
    ResizingPredictor(inner, size=(16, 48))(images)
    assert seen == [(1, 16, 32, 3), (1, 16, 48, 3)]
    # Evaluation upsamples whatever comes out back to the full label size.
    label = np.zeros((32, 64), np.uint8)
    m = evaluate(ResizingPredictor(inner, scale=0.5), [Sample(images[0], label, "x")], ["a", "b"])
    assert m["raw"]["iou"] == [1.0, None]
    with pytest.raises(ValueError, match="exactly one"):
        ResizingPredictor(inner)


def test_synthia_subset_mious_from_one_confusion_by_hand() -> None:
    """19-way confusion: road 10 right and 2 as terrain, wall 5 right and 5 as road, nothing else. IoU(road)
    = 10 / (12 + 15 - 10), IoU(wall) = 5 / (10 + 5 - 5), IoU(terrain) = 0 (predicted, never labelled)."""
    from calibration.classes import TRAIN_ID

    road, wall, terrain = TRAIN_ID["road"], TRAIN_ID["wall"], TRAIN_ID["terrain"]
    conf = np.zeros((19, 19), np.int64)
    conf[road, road], conf[road, terrain] = 10, 2
    conf[wall, wall], conf[wall, road] = 5, 5
    iou_road, iou_wall = 10 / 17, 0.5
    all19 = class_metrics(conf)
    assert all19["miou"] == pytest.approx((iou_road + iou_wall + 0) / 3)
    by = all19["miou_by_classes"]
    assert by["19"] == pytest.approx((iou_road + iou_wall) / 3)
    assert by["16"] == pytest.approx((iou_road + iou_wall) / 2)  # terrain is not among SYNTHIA's 16
    assert by["13"] == pytest.approx(iou_road)  # nor wall among the 13
    sub = class_metrics(conf, SUBSETS[16])
    assert sub["miou"] == pytest.approx(by["16"]) and sub["iou_std"] == pytest.approx(abs(iou_road - 0.5) / 2)
    assert len(sub["iou"]) == 19  # per-class IoUs stay 19-way
    assert class_metrics(np.eye(3, dtype=np.int64))["miou_by_classes"] == {}


def test_class_subset_needs_a_19_class_model() -> None:
    assert class_subset(None, 6) is None and class_subset(19, 19) is None
    assert class_subset(13, 19) == SUBSETS[13]
    with pytest.raises(ValueError, match=r"--classes: expected one of \[13, 16, 19\], got 12"):
        class_subset(12, 19)
    with pytest.raises(ValueError, match=r"--classes 16: expected a 19-class model .* got 6 classes"):
        class_subset(16, 6)


@pytest.mark.parametrize(
    ("h", "w", "height", "width"),
    [(8, 16, 32, 64), (5, 7, 23, 50), (32, 64, 256, 512), (9, 9, 4, 5), (1, 3, 6, 6)],
)
def test_core_upsample_equals_torch_interpolate(h: int, w: int, height: int, width: int) -> None:
    """The service's numpy upsample is torch's F.interpolate(bilinear, align_corners=False), the one the
    networks and the training-time GMM fits use: served decisions see the logits training saw."""
    from calibration.segmentation import upsample_bilinear

    logits = np.random.default_rng(h * w).normal(0, 4, (1, 5, h, w)).astype(np.float32)
    np.testing.assert_allclose(
        upsample_bilinear(logits[0], (height, width)), upsample_logits(logits, (height, width))[0], atol=2e-5
    )


def test_evaluated_decisions_are_the_pipelines_at_the_decision_size() -> None:
    """Labels larger than the model's input x decision_scale: decided at input x scale, then nearest to
    the label, as the service serves them (not at the label's size)."""
    from calibration.segmentation import decide, resize_nearest
    from training.evaluation.predictors import ResizingPredictor

    rng = np.random.default_rng(5)
    c = 3
    fixed = rng.normal(0, 3, (1, c, 2, 2)).astype(np.float32)
    seen: list[tuple[int, ...]] = []

    def coarse(images: np.ndarray) -> np.ndarray:  # (N, 4, 4, 3) -> (N, C, 2, 2): stride 2
        seen.append(images.shape)
        return fixed

    predictor = ResizingPredictor(coarse, size=(4, 4))
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    label = rng.integers(0, c, (16, 16)).astype(np.uint8)
    conf = accumulate_confusions(predictor, [Sample(image, label, "x")], c)
    made = decide(predictor(image[None])[0], (8, 8))  # input 4 x 4 x decision_scale 2
    expected = np.zeros((c, c), np.int64)
    np.add.at(expected, (label.ravel(), resize_nearest(made.raw, 16, 16).ravel()), 1)
    np.testing.assert_array_equal(conf.raw, expected)
    assert seen[0] == (1, 4, 4, 3)
    at_label = decide(predictor(image[None])[0], (16, 16)).raw
    assert not np.array_equal(at_label, resize_nearest(made.raw, 16, 16)), (
        "the case must tell the sizes apart"
    )
