"""Torch-free readers of GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes and plain image/label folders (and of the
synthetic benchmark, which is written in the GTA5 or SYNTHIA and the Cityscapes layouts).

Every dataset indexes to a `Sample`: an RGB uint8 image and uint8 train ids (255 = ignore). The training code
wraps these in torch Datasets. Layouts (as distributed):

    GTA5        root/images/00001.png, root/labels/00001.png (label ids, palette or grey PNG)
    SYNTHIA     root/RGB/0000000.png, root/GT/LABELS/0000000.png (16-bit, class id in channel 0)
    Cityscapes  root/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png
                root/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png (label ids, grey PNG)
    folder      root/images/{stem}.png|jpg, root/labels/{stem}.png (train ids, 255 = ignore), optional
                root/classes.json and root/splits/{train,val}.txt

`FORMATS` opens any of them by name for a split (the training package's one opener builds on it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from calibration.labels import IGNORE_INDEX
from calibration.classes import (
    CLASS_NAMES,
    LABEL_TO_TRAIN,
    NUM_CLASSES,
    NUM_LABEL_IDS,
    PALETTE,
    SYNTHIA_NUM_IDS,
    subset_names,
    synthia_lut,
)
from training.data.png16 import PngError, png_header, read_png16

Size = tuple[int, int]  # (height, width)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; str() names the path and what was expected."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8 train ids, 255 = ignore
    name: str


def read_image(path: Path, size: Size | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, optionally resized bilinearly to size = (height, width)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb)
    except FileNotFoundError:
        raise DatasetError(path, "expected an image file, but it does not exist") from None
    except OSError as e:
        raise DatasetError(path, f"expected a readable image, got {e}") from None


def read_label_ids(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids from a grey ('L') or palette ('P') PNG, as GTA5 and Cityscapes store them."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DatasetError(
                    path, f"expected a single-channel label PNG (mode L or P), got mode {im.mode}"
                )
            return np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(path, "expected a label file, but it does not exist") from None
    except DatasetError:
        raise
    except OSError as e:
        raise DatasetError(path, f"expected a readable label PNG, got {e}") from None


def read_synthia_ids(path: Path) -> np.ndarray:
    """(H, W) uint16 SYNTHIA class ids: first channel of a 16-bit label PNG (grey or 8-bit also accepted)."""
    if not path.is_file():
        raise DatasetError(path, "expected a label file, but it does not exist")
    try:
        _, _, depth, color_type = png_header(path)
        if depth == 16 and color_type != 0:
            arr = read_png16(path)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im)
    except (PngError, OSError) as e:
        raise DatasetError(path, f"expected a readable 16-bit label PNG, got {e}") from None
    return (arr[..., 0] if arr.ndim == 3 else arr).astype(np.uint16)


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """(H, W) uint8 -> (height, width) with nearest neighbour, so no new class ids appear."""
    if label.shape == size:
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _check_ids(ids: np.ndarray, limit: int, path: Path, what: str) -> None:
    if ids.size and int(ids.max()) >= limit:
        unknown = np.unique(ids[ids >= limit])
        shown = ", ".join(str(int(u)) for u in unknown[:10])
        raise DatasetError(path, f"expected {what} in 0..{limit - 1}, got unknown ids {shown}")


def _images_in(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(folder, f"expected a folder of {what}, but it does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(folder, f"expected {what} (.png/.jpg), but the folder is empty")
    return files


def _pair_up(images: list[Path], label_of: dict[Path, Path]) -> None:
    missing = [img for img in images if not label_of[img].is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            label_of[missing[0]],
            f"expected the label of image {missing[0].name}, but it does not exist{more}",
        )


class _PairDataset:
    """A list of (image, label) files; subclasses say how label files are read and mapped."""

    def __init__(
        self, pairs: list[tuple[Path, Path, str]], size: Size | None, class_names: tuple[str, ...]
    ) -> None:
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size: expected (height, width) with positive ints, got {size}")
        self.pairs = pairs
        self.size = size
        self.class_names = class_names
        self.num_classes = len(class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def _train_ids(self, label_path: Path) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index: expected 0..{len(self) - 1}, got {index}")
        image_path, label_path, name = self.pairs[index]
        label = self._train_ids(label_path)
        if self.size is None:
            image = read_image(image_path)
            if image.shape[:2] != label.shape:
                raise DatasetError(
                    label_path,
                    f"expected a label of the image's size {image.shape[0]}x{image.shape[1]}, "
                    f"got {label.shape[0]}x{label.shape[1]}",
                )
        else:
            # both are resized to one size, so a few mismatched pairs (GTA5 has some) are harmless
            image = read_image(image_path, self.size)
            label = resize_label(label, self.size)
        return Sample(image=image, label=label, name=name)

    def label(self, index: int) -> np.ndarray:
        """(H, W) uint8 train ids of one sample without decoding its image (for class statistics)."""
        label = self._train_ids(self.pairs[index][1])
        return label if self.size is None else resize_label(label, self.size)


class Gta5Dataset(_PairDataset):
    """GTA5 (and the synthetic source domain): root/images/*.png with root/labels/<same name> in label ids."""

    def __init__(self, root: Path | str, size: Size | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(
                root, "expected the GTA5 root folder (with images/ and labels/), but it does not exist"
            )
        images = _images_in(root / "images", "GTA5 images")
        label_of = {img: root / "labels" / (img.stem + ".png") for img in images}
        if not (root / "labels").is_dir():
            raise DatasetError(root / "labels", "expected a folder of GTA5 label PNGs, but it does not exist")
        _pair_up(images, label_of)
        super().__init__([(img, label_of[img], img.stem) for img in images], size, CLASS_NAMES)

    def _train_ids(self, label_path: Path) -> np.ndarray:
        ids = read_label_ids(label_path)
        _check_ids(ids, NUM_LABEL_IDS, label_path, "Cityscapes label ids")
        return LABEL_TO_TRAIN[ids]


class CityscapesDataset(_PairDataset):
    """Cityscapes (and the synthetic target domain): leftImg8bit/{split}/{city}/ with gtFine label ids."""

    SPLITS = ("train", "val", "test")

    def __init__(self, root: Path | str, split: str = "train", size: Size | None = None) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split: expected one of {self.SPLITS}, got {split!r}")
        root = Path(root)
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise DatasetError(
                img_dir,
                f"expected the Cityscapes image folder leftImg8bit/{split}/<city>/, but it does not exist",
            )
        images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DatasetError(img_dir, "expected <city>/<stem>_leftImg8bit.png files, but found none")
        label_of = {
            img: root
            / "gtFine"
            / split
            / img.parent.name
            / img.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            for img in images
        }
        _pair_up(images, label_of)
        pairs = [(img, label_of[img], img.name.removesuffix("_leftImg8bit.png")) for img in images]
        super().__init__(pairs, size, CLASS_NAMES)
        self.split = split

    def _train_ids(self, label_path: Path) -> np.ndarray:
        ids = read_label_ids(label_path)
        _check_ids(ids, NUM_LABEL_IDS, label_path, "Cityscapes label ids")
        return LABEL_TO_TRAIN[ids]


class SynthiaDataset(_PairDataset):
    """SYNTHIA-RAND-CITYSCAPES: root/RGB/*.png with 16-bit root/GT/LABELS/<same name>.

    num_classes = 19 maps onto the Cityscapes train ids; 16 and 13 give contiguous indices of the usual
    evaluation subsets (`class_names` lists them), with the other classes ignored.
    """

    def __init__(self, root: Path | str, num_classes: int = NUM_CLASSES, size: Size | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(
                root, "expected the SYNTHIA root folder (with RGB/ and GT/LABELS/), but it does not exist"
            )
        names = subset_names(num_classes)  # validates num_classes
        images = _images_in(root / "RGB", "SYNTHIA images")
        labels_dir = root / "GT" / "LABELS"
        if not labels_dir.is_dir():
            raise DatasetError(
                labels_dir, "expected a folder of 16-bit SYNTHIA label PNGs, but it does not exist"
            )
        label_of = {img: labels_dir / (img.stem + ".png") for img in images}
        _pair_up(images, label_of)
        super().__init__([(img, label_of[img], img.stem) for img in images], size, names)
        self._lut = synthia_lut(num_classes)

    def _train_ids(self, label_path: Path) -> np.ndarray:
        ids = read_synthia_ids(label_path)
        _check_ids(ids, SYNTHIA_NUM_IDS, label_path, "SYNTHIA class ids")
        return self._lut[ids]


def hold_out(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic split of n samples: (kept indices, held-out indices), every k-th sample held out (k =
    round(1 / fraction)), so the held-out part is spread over the whole (often sequence-ordered) list."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    step = max(2, round(1 / fraction))
    held = list(range(step - 1, n, step))
    kept = set(held)
    return [i for i in range(n) if i not in kept], held


def _few(items: list[str], total: int | None = None, shown: int = 5) -> str:
    """The first few of a list of names and how many there are in all (error messages)."""
    total = len(items) if total is None else total
    more = f" (and {total - shown} more)" if total > shown else ""
    return ", ".join(items[:shown]) + more


@dataclass(frozen=True)
class FolderClasses:
    """A folder dataset's classes (classes.json): names, colours, and optionally the raw label id of each
    stored value -> train id (unmapped raw ids are ignored)."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    lut: np.ndarray | None  # (256,) uint8 raw id -> train id, or None: the labels are train ids


CITYSCAPES_CLASSES = FolderClasses(CLASS_NAMES, tuple((int(r), int(g), int(b)) for r, g, b in PALETTE), None)


def read_classes(path: Path) -> FolderClasses:
    """classes.json: {"names": [...], "colors": [[r, g, b], ...] (optional), "ids": {"raw": train, ...}
    (optional)}. Errors name the file and field."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(path, f"expected a JSON classes file, got {e}") from None
    if not isinstance(spec, dict):
        raise DatasetError(path, f"expected a JSON object with 'names', got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"names", "colors", "ids"})
    if unknown:
        raise DatasetError(path, f"expected keys among ['colors', 'ids', 'names'], got {unknown}")
    names = spec.get("names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DatasetError(path, f"names: expected a non-empty list of strings, got {names!r}")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(path, f"names: expected at most {IGNORE_INDEX} classes, got {len(names)}")
    colors = spec.get("colors", [[0, 0, 0]] * len(names))
    if not (
        isinstance(colors, list)
        and len(colors) == len(names)
        and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in colors
        )
    ):
        raise DatasetError(
            path, f"colors: expected {len(names)} [r, g, b] lists of ints in 0..255, got {colors!r}"
        )
    lut = None
    ids = spec.get("ids")
    if ids is not None:
        if not isinstance(ids, dict):
            raise DatasetError(path, f"ids: expected an object raw id -> train id, got {ids!r}")
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for raw, train in ids.items():
            if not (raw.isdigit() and int(raw) <= 255):
                raise DatasetError(path, f"ids: expected raw ids in 0..255, got {raw!r}")
            if not (isinstance(train, int) and (0 <= train < len(names) or train == IGNORE_INDEX)):
                raise DatasetError(
                    path,
                    f"ids.{raw}: expected a train id in 0..{len(names) - 1} or {IGNORE_INDEX}, got {train!r}",
                )
            lut[int(raw)] = train
    return FolderClasses(tuple(names), tuple((c[0], c[1], c[2]) for c in colors), lut)


def _read_list(path: Path) -> list[str]:
    """Stems of a split list file: one per line, blank lines and # comments skipped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Path(line).stem if "." in line else line for line in lines if line]


class FolderDataset(_PairDataset):
    """Plain folders: root/images/<stem>.png|jpg with root/labels/<stem>.png, matched by file stem.

    Labels are 8-bit train ids (255 = ignore), or raw ids mapped by root/classes.json's "ids"; without
    classes.json the classes are the 19 Cityscapes ones. split "all" is every pair; "train"/"val" come from
    root/splits/{split}.txt (one stem per line) when root/splits/ exists, else every k-th pair is val with
    k = round(1 / val_fraction).
    """

    SPLITS = ("train", "val", "all")

    def __init__(
        self, root: Path | str, split: str = "all", val_fraction: float = 0.0, size: Size | None = None
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split: expected one of {list(self.SPLITS)}, got {split!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction: expected in [0, 1), got {val_fraction}")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(root, "expected a folder with images/ and labels/, but it does not exist")
        images = {p.stem: p for p in _images_in(root / "images", "images")}
        labels_dir = root / "labels"
        if not labels_dir.is_dir():
            raise DatasetError(labels_dir, "expected a folder of label PNGs, but it does not exist")
        labels = {p.stem: p for p in sorted(labels_dir.glob("*.png")) if p.is_file()}
        unmatched = [f"images/{images[s].name} (no label)" for s in sorted(images.keys() - labels.keys())]
        unmatched += [f"labels/{labels[s].name} (no image)" for s in sorted(labels.keys() - images.keys())]
        if unmatched:
            raise DatasetError(
                root,
                f"expected images/ and labels/ to match by file stem, got {len(unmatched)} unmatched: "
                + _few(unmatched),
            )
        classes_file = root / "classes.json"
        self.classes = read_classes(classes_file) if classes_file.is_file() else CITYSCAPES_CLASSES
        stems = sorted(images)
        stems = stems if split == "all" else self._split(root, stems, split, val_fraction)
        pairs = [(images[s], labels[s], s) for s in stems]
        super().__init__(pairs, size, self.classes.names)
        self.split = split

    @staticmethod
    def _split(root: Path, stems: list[str], split: str, val_fraction: float) -> list[str]:
        if (root / "splits").is_dir():
            listed = root / "splits" / f"{split}.txt"
            if not listed.is_file():
                raise DatasetError(listed, f"expected the list of {split} stems, but it does not exist")
            wanted = _read_list(listed)
            known = set(stems)
            missing = [s for s in wanted if s not in known]
            if missing:
                raise DatasetError(
                    listed,
                    f"expected stems of matched images/ and labels/ files, got {len(missing)} unknown: "
                    + _few(missing),
                )
            if not wanted:
                raise DatasetError(listed, f"expected at least one {split} stem, but the list is empty")
            return wanted
        if split == "val" and val_fraction <= 0:
            raise DatasetError(root / "splits", "expected splits/val.txt or a val fraction > 0, got neither")
        kept, held = hold_out(len(stems), val_fraction)
        return [stems[i] for i in (kept if split == "train" else held)]

    def _train_ids(self, label_path: Path) -> np.ndarray:
        ids = read_label_ids(label_path)
        if self.classes.lut is not None:
            return self.classes.lut[ids]
        bad = (ids >= self.num_classes) & (ids != IGNORE_INDEX)
        if bad.any():
            shown = ", ".join(str(int(u)) for u in np.unique(ids[bad])[:10])
            raise DatasetError(
                label_path,
                f"expected train ids in 0..{self.num_classes - 1} or {IGNORE_INDEX} (ignore), got {shown}",
            )
        return ids


def split_folder(root: Path, split: str) -> Path:
    """Layouts without splits (GTA5, SYNTHIA) keep each split in its own folder: train in `root`, val in
    `root`_val (the synthetic benchmark's source/ and source_val/)."""
    return root if split == "train" else root.with_name(f"{root.name}_{split}")


def _open_gta5(root: Path, split: str, val_fraction: float) -> _PairDataset:
    return Gta5Dataset(split_folder(root, split))


def _open_synthia(root: Path, split: str, val_fraction: float) -> _PairDataset:
    # 19-way: the training head and the evaluation are 19-way; the classes SYNTHIA lacks never appear.
    return SynthiaDataset(split_folder(root, split))


def _open_cityscapes(root: Path, split: str, val_fraction: float) -> _PairDataset:
    return CityscapesDataset(root, split)


def _open_folder(root: Path, split: str, val_fraction: float) -> _PairDataset:
    return FolderDataset(root, split, val_fraction)


# The dataset formats by name: (domain folder, split "train" | "val", val fraction of the folder format)
# -> dataset. `data.source_format` / `data.target_format` name one of these.
FORMATS: dict[str, Callable[[Path, str, float], _PairDataset]] = {
    "gta5": _open_gta5,
    "synthia": _open_synthia,
    "cityscapes": _open_cityscapes,
    "folder": _open_folder,
}


def open_dataset(fmt: str, root: Path | str, split: str, val_fraction: float = 0.0) -> Any:
    """The `split` ("train" or "val") of the dataset in format `fmt` at `root`; an unknown format lists the
    options."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {sorted(FORMATS)}, got {fmt!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    return FORMATS[fmt](Path(root), split, val_fraction)
