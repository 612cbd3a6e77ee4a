"""Write a generated benchmark in the real datasets' layouts.

The source and a held-out source split, in the GTA5 layout (labels: Cityscapes label ids in palette PNGs):
    DIR/source/images/00001.png, DIR/source/labels/00001.png
    DIR/source_val/images/00001.png, DIR/source_val/labels/00001.png
or, with source_layout = "synthia", in SYNTHIA-RAND-CITYSCAPES's (16-bit RGB label PNGs, SYNTHIA class id in
the first channel, instance 0; its 16 classes, so terrain, truck and train pixels are void, id 0):
    DIR/source/RGB/0000000.png, DIR/source/GT/LABELS/0000000.png (and DIR/source_val/...)
Cityscapes:
    DIR/target/leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
    DIR/target/gtFine/{train,val}/{city}/{city}_{seq:06d}_000019_gtFine_labelIds.png
DIR/synth.json: config, seed, class pixel frequencies per domain and split.

Each image has its own generator seeded by (seed, domain, split, index), so the bytes do not depend on the
number of workers or on the order in which images are produced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from calibration.classes import (
    CLASS_NAMES,
    CLASSES,
    LABEL_TO_TRAIN,
    NUM_CLASSES,
    SYNTHIA_16_TRAIN_IDS,
    SYNTHIA_TO_TRAIN,
    TRAIN_TO_LABEL,
)
from training.data.png16 import write_png16
from training.data.synth.canvas import EGO
from training.data.synth.config import DomainConfig, SynthConfig, domain_configs
from training.data.synth.scene import render_scene

TRAIN_CITIES = ("aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf")
VAL_CITIES = ("frankfurt", "lindau", "munster")
_SPLIT_CODE = {"train": 0, "val": 1}
_DOMAIN_CODE = {"source": 0, "target": 1}

# train ids (and the ego-vehicle marker) -> Cityscapes label ids as stored on disk
_TO_LABEL_ID = TRAIN_TO_LABEL.copy()
_TO_LABEL_ID[EGO] = 1  # "ego vehicle"


def _label_palette() -> list[int]:
    """Palette for the GTA5-style label PNGs: index = label id, colour = that class's Cityscapes colour."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for c in CLASSES:
        pal[c.label_id] = c.color
    return pal.ravel().tolist()


_PALETTE = _label_palette()


def _label_to_synthia() -> np.ndarray:
    """(256,) uint16: Cityscapes label id -> SYNTHIA id for the 16 classes SYNTHIA has, else 0 (void)."""
    to_synthia = {train: synthia for synthia, train in SYNTHIA_TO_TRAIN.items()}
    lut = np.zeros(256, dtype=np.uint16)
    for train_id in SYNTHIA_16_TRAIN_IDS:
        lut[CLASSES[train_id].label_id] = to_synthia[train_id]
    return lut


_LABEL_TO_SYNTHIA = _label_to_synthia()
# Cityscapes label ids SYNTHIA keeps (the others are written as void, 0 = "unlabeled").
_SYNTHIA_KEEPS = np.isin(LABEL_TO_TRAIN, SYNTHIA_16_TRAIN_IDS)


@dataclass(frozen=True)
class Task:
    domain: str  # "source" | "target"
    split: str  # "train" | "val"
    index: int  # 0-based within (domain, split)
    image_path: Path
    label_path: Path


def image_seed(seed: int, domain: str, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _DOMAIN_CODE[domain], _SPLIT_CODE[split], index])


def render_one(config: SynthConfig, domain: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 Cityscapes label ids of one benchmark image."""
    source, target = domain_configs(config.shift)
    dom: DomainConfig = source if domain == "source" else target
    rng = np.random.default_rng(image_seed(config.seed, domain, split, index))
    image, train_ids = render_scene(rng, config.scene, dom)
    return image, _TO_LABEL_ID[train_ids]


def cityscapes_name(split: str, index: int, count: int) -> tuple[str, str]:
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index * len(cities) // max(count, 1)]
    return city, f"{city}_{index:06d}_000019"


def source_paths(layout: str, folder: Path, index: int) -> tuple[Path, Path]:
    """(image, label) files of source image `index` in the GTA5 or the SYNTHIA layout."""
    if layout == "synthia":  # SYNTHIA numbers from 0 with seven digits
        name = f"{index:07d}.png"
        return folder / "RGB" / name, folder / "GT" / "LABELS" / name
    name = f"{index + 1:05d}.png"
    return folder / "images" / name, folder / "labels" / name


def plan(config: SynthConfig, out: Path) -> list[Task]:
    tasks = []
    for split, count, folder in (
        ("train", config.source_count, "source"),
        ("val", config.source_val_count, "source_val"),
    ):
        for i in range(count):
            tasks.append(Task("source", split, i, *source_paths(config.source_layout, out / folder, i)))
    for split, count in (("train", config.target_count), ("val", config.val_count)):
        for i in range(count):
            city, stem = cityscapes_name(split, i, count)
            tasks.append(
                Task(
                    "target",
                    split,
                    i,
                    out / "target" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                    out / "target" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                )
            )
    return tasks


def _run(args: tuple[SynthConfig, Task]) -> tuple[str, str, np.ndarray]:
    config, task = args
    image, label_ids = render_one(config, task.domain, task.split, task.index)
    Image.fromarray(image).save(task.image_path, compress_level=1)
    if task.domain == "source" and config.source_layout == "synthia":
        label_ids = np.where(_SYNTHIA_KEEPS[label_ids], label_ids, 0).astype(np.uint8)  # what is written
        ids = _LABEL_TO_SYNTHIA[label_ids]
        # Up-filtered rows: read back vectorised by png16 (Paeth, as some real files use, is ~50x slower).
        write_png16(task.label_path, np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], -1), 2)
    elif task.domain == "source":  # GTA5 ships palette PNGs whose indices are the label ids
        lab = Image.fromarray(label_ids, mode="L").convert("P")
        lab.putpalette(_PALETTE)
        lab.save(task.label_path, compress_level=1)
    else:
        Image.fromarray(label_ids, mode="L").save(task.label_path, compress_level=1)
    counts = np.bincount(label_ids.ravel(), minlength=256)[:256].astype(np.int64)
    return task.domain, task.split, counts


def _map(config: SynthConfig, tasks: list[Task], workers: int) -> Iterator[tuple[str, str, np.ndarray]]:
    args = [(config, t) for t in tasks]
    if workers <= 1:
        yield from map(_run, args)
        return
    # fork is cheap and every worker re-seeds per image, so the start method does not affect the bytes
    with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_run, args, chunksize=4)


def generate(
    config: SynthConfig,
    out: Path,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Write the whole benchmark under `out`; returns (and writes to synth.json) its description."""
    out = Path(out)
    tasks = plan(config, out)
    for d in {t.image_path.parent for t in tasks} | {t.label_path.parent for t in tasks}:
        d.mkdir(parents=True, exist_ok=True)
    totals: dict[str, np.ndarray] = {}
    for done, (domain, split, counts) in enumerate(_map(config, tasks, workers), start=1):
        key = f"{domain}/{split}"
        totals[key] = totals.get(key, np.zeros(256, dtype=np.int64)) + counts
        if progress is not None:
            progress(done, len(tasks))
    info = describe(config, totals)
    (out / "synth.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def describe(config: SynthConfig, label_id_counts: dict[str, np.ndarray]) -> dict[str, object]:
    source, target = domain_configs(config.shift)
    freqs: dict[str, dict[str, float]] = {}
    for key, counts in sorted(label_id_counts.items()):
        per_class = np.array([counts[c.label_id] for c in CLASSES], dtype=np.float64)
        total = max(float(counts.sum()), 1.0)
        freqs[key] = {
            name: round(float(v) / total, 6) for name, v in zip(CLASS_NAMES, per_class, strict=True)
        }
    return {
        "format": "blda-synth",
        "version": 1,
        "seed": config.seed,
        "counts": {
            "source": config.source_count,
            "source_val": config.source_val_count,
            "target_train": config.target_count,
            "target_val": config.val_count,
        },
        "config": dataclasses.asdict(config),
        "domains": {"source": dataclasses.asdict(source), "target": dataclasses.asdict(target)},
        "class_frequencies": freqs,
        "num_classes": NUM_CLASSES,
        "source_layout": config.source_layout,
        "layouts": {
            "source": (
                "SYNTHIA: source/RGB/NNNNNNN.png, source/GT/LABELS/NNNNNNN.png (16-bit, SYNTHIA ids, 16 classes)"
                if config.source_layout == "synthia"
                else "GTA5: source/images/NNNNN.png, source/labels/NNNNN.png (Cityscapes label ids)"
            ),
            "source_val": f"{config.source_layout} layout, held-out source images",
            "target": (
                "Cityscapes: target/leftImg8bit/{split}/{city}/*_leftImg8bit.png, "
                "target/gtFine/{split}/{city}/*_gtFine_labelIds.png"
            ),
        },
    }
