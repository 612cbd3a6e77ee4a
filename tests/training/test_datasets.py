"""Dataset wrappers: seeded crops, prescaled caches, tuning split, batch keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.datasets import Sample, hold_out
from training.datasets import (
    CropSpec,
    EvalImages,
    TrainCrops,
    collate,
    draw_indices,
    iteration_seed,
    prescaled,
)


class _Data:
    def __init__(self, n: int = 5) -> None:
        rng = np.random.default_rng(0)
        self.items = [
            Sample(
                rng.integers(0, 256, (40, 80, 3)).astype(np.uint8),
                rng.integers(0, 19, (40, 80)).astype(np.uint8),
                str(i),
            )
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return self.items[i]


def test_crops_are_a_function_of_the_key() -> None:
    crops = TrainCrops(_Data(), CropSpec(16, 32, 0.5, 1.0), cache=False)
    a, b, c = crops[(2, 7)], crops[(2, 7)], crops[(2, 8)]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].shape == (16, 32, 3) and a["label"].shape == (16, 32)
    assert not np.array_equal(a["image"], c["image"]) or not np.array_equal(a["label"], c["label"])
    unlabelled = TrainCrops(_Data(), CropSpec(16, 32), labelled=False)[(0, 1)]
    assert "label" not in unlabelled and collate([unlabelled]).labels is None


def test_crop_pads_small_images_with_ignore() -> None:
    out = TrainCrops(_Data(), CropSpec(64, 128, 1.0, 1.0))[(0, 0)]
    assert out["image"].shape == (64, 128, 3)
    assert (out["label"][40:] == 255).all()


def test_prescaled_cache_round_trip(tmp_path: Path) -> None:
    data = _Data()
    first = prescaled(data, 0.5, tmp_path / "c")
    again = prescaled(data, 0.5, tmp_path / "c")  # read back from the files
    direct = EvalImages(data, 0.5)
    for i in range(len(data)):
        np.testing.assert_array_equal(first[i].image, direct[i]["image"])
        np.testing.assert_array_equal(again[i].label, direct[i]["label"])
        np.testing.assert_array_equal(again.label(i), direct[i]["label"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.images.npy", "c.labels.npy"]


def test_held_out_split_is_disjoint_and_complete() -> None:
    train, tuning = hold_out(100, 0.1)
    assert len(tuning) == 10 and not set(train) & set(tuning) and sorted(train + tuning) == list(range(100))
    assert hold_out(10, 0.0) == (list(range(10)), [])


def test_batch_keys_depend_on_seed_iteration_and_rank() -> None:
    k = draw_indices(50, 4, iteration_seed(0, 3, 0, 1))
    assert k == draw_indices(50, 4, iteration_seed(0, 3, 0, 1))
    assert k != draw_indices(50, 4, iteration_seed(0, 3, 1, 1))
    assert k != draw_indices(50, 4, iteration_seed(0, 4, 0, 1))

    class OnlyThree:
        def sample(self, rng: np.random.Generator) -> tuple[int, int]:
            return 3, int(rng.integers(0, 19))

    assert [i for i, _ in draw_indices(50, 5, 1, OnlyThree())] == [3] * 5
