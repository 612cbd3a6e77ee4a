import numpy as np
import pytest

from training.data.sampling import (
    RareClassSampler,
    class_pixel_counts,
    dataset_class_counts,
    rcs_probabilities,
)


def test_class_pixel_counts_matches_a_loop():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 22, (17, 23)).astype(np.uint8)
    label[0, :5] = 255
    counts = class_pixel_counts(label, 19)
    for c in range(19):
        assert counts[c] == int(np.sum(label == c))
    assert counts.sum() == np.sum(label < 19)


def test_rcs_probabilities_formula():
    counts = np.array([[900, 90, 10, 0], [0, 0, 0, 0]])
    t = 0.5
    p = rcs_probabilities(counts, t)
    f = np.array([0.9, 0.09, 0.01])
    ref = np.exp((1 - f) / t)
    ref = ref / ref.sum()
    assert np.allclose(p[:3], ref)
    assert p[3] == 0.0  # never seen
    assert np.all(np.diff(p[:3]) > 0)  # rarer -> more likely
    with pytest.raises(ValueError, match="temperature"):
        rcs_probabilities(counts, 0.0)


def test_low_temperature_concentrates_on_the_rarest_class():
    counts = np.array([[1000, 100, 10]])
    assert rcs_probabilities(counts, 0.01)[2] > 0.99
    assert np.allclose(rcs_probabilities(counts, 1e6), 1 / 3, atol=1e-4)


def test_sampler_draws_images_containing_the_class_and_is_deterministic():
    labels = [np.full((10, 10), c, dtype=np.uint8) for c in (0, 0, 0, 1, 2)]
    labels[1][:5] = 2
    counts = dataset_class_counts(labels, 3)
    sampler = RareClassSampler(counts, temperature=0.1, min_pixels=20)
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    draws = [sampler.sample(rng1) for _ in range(300)]
    assert draws == [sampler.sample(rng2) for _ in range(300)]
    for index, c in draws:
        assert counts[index, c] >= 20
    freq = np.bincount([c for _, c in draws], minlength=3) / 300
    assert np.allclose(freq, sampler.probabilities, atol=0.08)


def test_sampler_skips_classes_without_a_qualifying_image():
    counts = np.array([[500, 3], [400, 2]])
    sampler = RareClassSampler(counts, temperature=0.01, min_pixels=10)
    assert sampler.probabilities[1] == 0.0 and sampler.probabilities[0] == 1.0
    with pytest.raises(ValueError, match="expected \\(N, C\\)"):
        RareClassSampler(np.array([1, 2]))
