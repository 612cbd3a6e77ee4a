"""Bias with labels (confusion, IoU, the paper's Bias) and without (logit distributions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from calibration.bias import (
    anchor_distance,
    bias_from_confusion,
    confusion_matrix,
    iou_from_confusion,
    label_free_bias,
    subset_mean_iou,
)
from calibration.distributions import Gmm, fit_pair_gmms


def test_confusion_matrix_matches_a_loop_and_skips_ignored() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 7, 9)).astype(np.uint8)
    labels[0, 0] = 255
    pred = rng.integers(0, 4, (3, 7, 9))
    ref = np.zeros((4, 4), np.int64)
    for t, p in zip(labels.reshape(-1), pred.reshape(-1), strict=True):
        if t != 255:
            ref[t, p] += 1
    got = confusion_matrix(pred, labels, 4)
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.int64
    with pytest.raises(ValueError, match=r"expected predictions in \[0, 4\)"):
        confusion_matrix(np.full((2, 2), 4), np.zeros((2, 2), np.uint8), 4)
    with pytest.raises(ValueError, match="expected pred and labels of the same shape"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 4)


def test_hand_computed_example() -> None:
    # 3 classes; rows = true class, columns = predicted.
    conf = np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]])
    # Class 2 is absent: P(pred | y=0) = (.8, .2, 0), P(pred | y=1) = (0, .5, .5).
    np.testing.assert_allclose(bias_from_confusion(conf), [0.4 - 1 / 3, 0.35 - 1 / 3, 0.25 - 1 / 3])
    np.testing.assert_allclose(iou_from_confusion(conf), [8 / 10, 5 / 12, 0.0])
    iou = iou_from_confusion(np.array([[3, 0], [0, 0]]))
    assert iou[0] == 1.0 and np.isnan(iou[1])
    np.testing.assert_array_equal(bias_from_confusion(np.zeros((3, 3))), 0.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(2, 19))
def test_bias_sums_to_zero(seed: int, c: int) -> None:
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, (c, c)) * (rng.random((c, 1)) < 0.8)
    b = bias_from_confusion(conf)
    assert b.sum() == pytest.approx(0.0, abs=1e-12)
    assert np.all(b >= -1 / c - 1e-12)


def test_label_free_bias_ranks_classes_like_bias() -> None:
    rng = np.random.default_rng(1)
    c = 8
    offset = np.linspace(-1.5, 1.5, c)  # class l's logits run high by offset[l]: over-predicted
    rng.shuffle(offset)
    labels = rng.integers(0, c, (4, 30, 40))
    logits = rng.normal(0, 1.5, (4, c, 30, 40)) + offset[None, :, None, None]
    logits += 3 * np.eye(c)[labels].transpose(0, 3, 1, 2)
    bias = bias_from_confusion(confusion_matrix(logits.argmax(1), labels, c))
    pairs, counts = fit_pair_gmms(logits, labels, c, k=3)
    lf = label_free_bias(pairs, counts)
    assert lf.shape == (c,)
    assert spearmanr(lf, bias).statistic > 0.9
    assert spearmanr(lf, offset).statistic > 0.9
    counts[2, 2] = 0
    assert np.isnan(label_free_bias(pairs, counts)[2])


def test_anchor_distance_is_wasserstein_1() -> None:
    anchor = Gmm(np.array([1.0]), np.array([0.0]), np.array([1.0]))
    shifted = Gmm(np.array([[1.0], [1.0]]), np.array([[0.0], [2.5]]), np.array([[1.0], [1.0]]))
    d = anchor_distance(shifted, anchor)
    np.testing.assert_allclose(d, [0.0, 2.5], atol=1e-3)  # W1 between translates = the translation
    wide = Gmm(np.array([1.0]), np.array([0.0]), np.array([2.0]))
    # W1(N(0,1), N(0,4)) = E|Z| * (2 - 1) = sqrt(2/pi).
    assert anchor_distance(wide, anchor) == pytest.approx(np.sqrt(2 / np.pi), rel=0.01)


def test_subset_mean_iou_by_hand() -> None:
    conf = np.array(
        [
            [3, 1, 0, 0, 0],
            [0, 2, 0, 2, 0],
            [1, 0, 4, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    # IoU = tp / (row + column - tp): 3/5, 2/5, 4/5, 0/2 (predicted, never labelled), nan (class 4 absent)
    assert subset_mean_iou(conf, [0, 2]) == pytest.approx(0.7)
    assert subset_mean_iou(conf, [1, 3]) == pytest.approx(0.2)
    assert subset_mean_iou(conf, [0, 1, 2, 3, 4]) == pytest.approx(0.45)  # the absent class is skipped
    assert np.isnan(subset_mean_iou(conf, [4]))
    with pytest.raises(ValueError, match=r"classes: expected indices in \[0, 5\), got \[5\]"):
        subset_mean_iou(conf, [5])
