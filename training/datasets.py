"""torch Dataset wrappers and collation around the data helper's numpy loaders.

Every random choice of a sample (scale, crop, flip) comes from a seed carried in the index, so a batch is a
pure function of (run seed, iteration, process rank): resumed and multi-process runs draw exactly the batches
an uninterrupted run draws.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from calibration.labels import IGNORE_INDEX
from training.networks import images_to_tensor


class NumpySample(Protocol):
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray | None  # (H, W) uint8 train ids


class NumpyDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


def resize_pair(
    image: np.ndarray, label: np.ndarray | None, scale: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Bilinear image, nearest label; scale 1 returns the inputs."""
    if scale == 1.0:
        return image, label
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    lab = None if label is None else np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    return img, lab


def random_crop(
    image: np.ndarray, label: np.ndarray | None, height: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop (padding with 0 / ignore where the image is smaller)."""
    h, w = image.shape[:2]
    if h < height or w < width:
        ph, pw = max(0, height - h), max(0, width - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        h, w = image.shape[:2]
    y = int(rng.integers(0, h - height + 1))
    x = int(rng.integers(0, w - width + 1))
    image = image[y : y + height, x : x + width]
    label = None if label is None else label[y : y + height, x : x + width]
    return image, label


@dataclass(frozen=True)
class CropSpec:
    height: int = 128
    width: int = 256
    scale_min: float = 0.5
    scale_max: float = 0.5
    flip: bool = True


class TrainCrops(torch.utils.data.Dataset):
    """Random scale, crop and flip of a numpy dataset; index = (sample index, seed)."""

    def __init__(self, base: NumpyDataset, spec: CropSpec, labelled: bool = True, cache: bool = True) -> None:
        self.base = base
        self.spec = spec
        self.labelled = labelled
        # With a fixed scale the decoded, rescaled sample is the same every time: keep it (PNG decoding
        # and resizing would otherwise cost as much as a forward pass on 2 cores).
        self.cache = cache and spec.scale_min == spec.scale_max
        self._cached: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def _scaled(self, index: int, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
        if self.cache and index in self._cached:
            return self._cached[index]
        sample = self.base[index]
        pair = resize_pair(sample.image, sample.label if self.labelled else None, scale)
        if self.cache:
            self._cached[index] = pair
        return pair

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        index, seed = key
        rng = np.random.default_rng(seed)
        scale = float(rng.uniform(self.spec.scale_min, self.spec.scale_max))
        image, label = self._scaled(index, scale)
        image, label = random_crop(image, label, self.spec.height, self.spec.width, rng)
        if self.spec.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            label = None if label is None else label[:, ::-1]
        out: dict[str, np.ndarray] = {"image": np.ascontiguousarray(image)}
        if label is not None:
            out["label"] = np.ascontiguousarray(label)
        return out


class EvalImages(torch.utils.data.Dataset):
    """Whole images resized by `scale` (labels nearest), for evaluation."""

    def __init__(self, base: NumpyDataset, scale: float = 0.5, limit: int = 0) -> None:
        self.base = base
        self.scale = scale
        self.limit = limit

    def __len__(self) -> int:
        n = len(self.base)
        return min(n, self.limit) if self.limit > 0 else n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        sample = self.base[index]
        image, label = resize_pair(sample.image, sample.label, self.scale)
        assert label is not None
        return {"image": image, "label": label}


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (N, 3, H, W) normalised float32
    labels: torch.Tensor | None  # (N, H, W) int64, IGNORE_INDEX where unlabelled


def collate(items: Sequence[dict[str, np.ndarray]]) -> Batch:
    images = images_to_tensor(np.stack([it["image"] for it in items]))
    labels = None
    if all("label" in it and it["label"] is not None for it in items):
        labels = torch.from_numpy(np.stack([it["label"] for it in items]).astype(np.int64))
    return Batch(images=images, labels=labels)


class Subset:
    """A numpy dataset restricted to some indices (e.g. target train minus the tuning split)."""

    def __init__(self, base: NumpyDataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[self.indices[index]]


def split_tuning(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic split of target train: (training indices, held-out tuning indices), every k-th image."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    step = max(2, round(1 / fraction))
    tuning = list(range(step - 1, n, step))
    held = set(tuning)
    return [i for i in range(n) if i not in held], tuning


def iteration_seed(seed: int, iteration: int, rank: int, stream: int) -> int:
    """A 63-bit seed for one (run, iteration, process, purpose)."""
    ss = np.random.SeedSequence([seed, iteration, rank, stream])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def draw_indices(n: int, batch: int, seed: int, sampler: Any | None = None) -> list[tuple[int, int]]:
    """`batch` (index, sample seed) keys, uniform or from a rare-class sampler
    (training.data.sampling.RareClassSampler: `sample(rng) -> (index, class)`)."""
    rng = np.random.default_rng(seed)
    if sampler is None:
        idx = rng.integers(0, n, size=batch)
    else:
        idx = np.array([sampler.sample(rng)[0] for _ in range(batch)])
    seeds = rng.integers(0, 2**62, size=batch)
    return [(int(i), int(s)) for i, s in zip(idx, seeds, strict=True)]


def source_class_counts(dataset: NumpyDataset, num_classes: int) -> np.ndarray:
    """(N, C) pixel counts per source image (labels only when the dataset can read them alone)."""
    from training.data.sampling import dataset_class_counts

    read = getattr(dataset, "label", None)
    labels = (read(i) if read is not None else dataset[i].label for i in range(len(dataset)))
    return dataset_class_counts(labels, num_classes)


def open_domains(data_dir: str | Path, source: str, target: str, tuning_fraction: float) -> dict[str, Any]:
    """The numpy datasets of a run: source (GTA5 layout), target train minus the tuning split, the tuning
    split and target val (Cityscapes layout), under data_dir. Errors name the missing folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected a data folder (see `blda synth`), got no such folder")
    return {
        "source": open_split(root, "source", "train", folder=source),
        "target_train": open_split(root, "target", "train", tuning_fraction, folder=target),
        "target_tuning": open_split(root, "target", "tuning", tuning_fraction, folder=target),
        "target_val": open_split(root, "target", "val", folder=target),
    }


@dataclass(frozen=True)
class ArraySample:
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8
    name: str


class ArrayDataset:
    """Samples held in two arrays (memory-mapped from a cache file)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.shape[:3] != labels.shape:
            raise ValueError(f"expected images (N, H, W, 3) matching labels (N, H, W), got {images.shape}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> ArraySample:
        return ArraySample(np.asarray(self.images[index]), np.asarray(self.labels[index]), str(index))

    def label(self, index: int) -> np.ndarray:
        return np.asarray(self.labels[index])


def prescaled(dataset: NumpyDataset, scale: float, cache: Path, labelled: bool = True) -> ArrayDataset:
    """The dataset decoded and rescaled once into `cache`.npz-like pair of .npy files (reused by later runs):
    PNG decoding and resizing would otherwise cost as much as a forward pass per image on 2 cores."""
    images_file = cache.with_name(cache.name + ".images.npy")
    labels_file = cache.with_name(cache.name + ".labels.npy")
    if not (images_file.is_file() and labels_file.is_file()):
        cache.parent.mkdir(parents=True, exist_ok=True)
        pairs = [resize_pair(s.image, s.label, scale) for s in (dataset[i] for i in range(len(dataset)))]
        images = np.stack([p[0] for p in pairs])
        labels = np.stack(
            [p[1] if p[1] is not None else np.full(p[0].shape[:2], IGNORE_INDEX) for p in pairs]
        )
        for arr, file in ((images, images_file), (labels.astype(np.uint8), labels_file)):
            tmp = file.with_name(file.name + f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, file)
    images = np.load(images_file, mmap_mode="r")
    labels = np.load(labels_file, mmap_mode="r")
    if images.shape[0] != len(dataset):
        raise ValueError(f"{images_file}: expected {len(dataset)} cached images, got {images.shape[0]}")
    return ArrayDataset(images, labels)


# Sub-folders of a data root as `blda synth` writes them (and where real datasets go): the source domain in
# the GTA5 layout (train and a held-out val), the target domain in the Cityscapes layout (train/val splits).
SOURCE_DIRS = {"train": "source", "val": "source_val"}
TARGET_DIR = "target"
# Target splits: "train" is target train less the tuning split (what adaptation and table fits see),
# "tuning" the held-out part of target train (every choice), "val" the reported split.
TARGET_SPLITS = ("train", "tuning", "val")


def open_split(
    data: str | Path, domain: str, split: str, tuning_fraction: float = 0.1, folder: str | None = None
) -> Any:
    """The dataset of `domain` ("source" or "target") and `split` under `data` (in `folder` instead of the
    domain's default sub-folder): the one opener of `blda train`, `evaluate`, `export` and `diagnose`.
    Errors name the folder and what was expected."""
    from training.data.datasets import CityscapesDataset, Gta5Dataset

    root = Path(data)
    if domain == "source":
        if split not in SOURCE_DIRS:
            raise ValueError(f"split: expected one of {sorted(SOURCE_DIRS)} for the source, got {split!r}")
        return Gta5Dataset(root / (folder if folder and split == "train" else SOURCE_DIRS[split]))
    if domain != "target":
        raise ValueError(f"domain: expected 'source' or 'target', got {domain!r}")
    if split not in TARGET_SPLITS:
        raise ValueError(f"split: expected one of {list(TARGET_SPLITS)} for the target, got {split!r}")
    target_root = root / (folder or TARGET_DIR)
    if split == "val":
        return CityscapesDataset(target_root, split="val")
    everything = CityscapesDataset(target_root, split="train")
    train_idx, tuning_idx = split_tuning(len(everything), tuning_fraction)
    return Subset(everything, train_idx if split == "train" else tuning_idx)


def load_split(data: str | Path, domain: str, split: str, limit: int = 0) -> Iterable[Any]:
    """Samples of `domain` and `split` under `data` (open_split), at most `limit` evenly spaced ones (0: all)."""
    dataset = open_split(data, domain, split)
    n = len(dataset)
    picks = range(n) if limit <= 0 or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)
    return (dataset[int(i)] for i in picks)
