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
from training.config import DataConfig
from training.data.datasets import FORMATS, Sample, hold_out, open_dataset
from training.networks import images_to_tensor


class NumpyDataset(Protocol):
    """What the training code reads: a sized sequence of `Sample`s (the readers of training.data.datasets,
    a Subset of one, or an ArrayDataset)."""

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


class ArrayDataset:
    """Samples held in two arrays (memory-mapped from a cache file)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.shape[:3] != labels.shape:
            raise ValueError(f"expected images (N, H, W, 3) matching labels (N, H, W), got {images.shape}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Sample:
        return Sample(np.asarray(self.images[index]), np.asarray(self.labels[index]), str(index))

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


# Target splits: "train" is target train less the tuning split (what adaptation and table fits see),
# "tuning" the held-out part of target train (every choice), "val" the reported split.
TARGET_SPLITS: tuple[str, ...] = ("train", "tuning", "val")
SOURCE_SPLITS: tuple[str, ...] = ("train", "val")


def open_split(data: str | Path, domain: str, split: str, config: DataConfig | None = None) -> Any:
    """The dataset of `domain` ("source" or "target") and `split` under the data root `data`, in the folder
    and format `config` names for that domain (data.source / data.source_format, data.target /
    data.target_format; defaults: GTA5 in source/, Cityscapes in target/): the one opener of `blda train`,
    `evaluate`, `export` and `diagnose`. Errors name the folder or file and what was expected."""
    cfg = config if config is not None else DataConfig()
    if domain == "source":
        splits, folder, fmt = SOURCE_SPLITS, cfg.source, cfg.source_format
    elif domain == "target":
        splits, folder, fmt = TARGET_SPLITS, cfg.target, cfg.target_format
    else:
        raise ValueError(f"domain: expected 'source' or 'target', got {domain!r}")
    if split not in splits:
        raise ValueError(f"split: expected one of {list(splits)} for the {domain}, got {split!r}")
    if fmt not in FORMATS:
        raise ValueError(f"data.{domain}_format: expected one of {sorted(FORMATS)}, got {fmt!r}")
    root = Path(data) / folder  # an absolute folder replaces the data root
    if domain == "source" or split == "val":
        return open_dataset(fmt, root, split, cfg.val_fraction)
    everything = open_dataset(fmt, root, "train", cfg.val_fraction)
    train_idx, tuning_idx = hold_out(len(everything), cfg.tuning_fraction)
    return Subset(everything, train_idx if split == "train" else tuning_idx)


def open_domains(data_dir: str | Path, config: DataConfig | None = None) -> dict[str, Any]:
    """The numpy datasets of a run (open_split): source train, target train minus the tuning split, the
    tuning split and target val. Errors name the missing folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected a data folder (see `blda synth`), got no such folder")
    return {
        "source": open_split(root, "source", "train", config),
        "target_train": open_split(root, "target", "train", config),
        "target_tuning": open_split(root, "target", "tuning", config),
        "target_val": open_split(root, "target", "val", config),
    }


def class_names(dataset: Any) -> tuple[str, ...] | None:
    """The class names a dataset declares (a reader's, or the base's of a Subset); None when it has none."""
    while isinstance(dataset, Subset):
        dataset = dataset.base
    names = getattr(dataset, "class_names", None)
    return tuple(names) if names is not None else None


def load_split(
    data: str | Path, domain: str, split: str, limit: int = 0, config: DataConfig | None = None
) -> Iterable[Sample]:
    """Samples of `domain` and `split` under `data` (open_split), at most `limit` evenly spaced ones (0: all)."""
    dataset = open_split(data, domain, split, config)
    n = len(dataset)
    picks = range(n) if limit <= 0 or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)
    return (dataset[int(i)] for i in picks)
