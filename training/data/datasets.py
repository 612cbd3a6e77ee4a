"""Torch-free readers of GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes (and of the synthetic benchmark,
which is written in the GTA5 and Cityscapes layouts).

Every dataset indexes to a `Sample`: an RGB uint8 image and uint8 train ids (255 = ignore). The training code
wraps these in torch Datasets. Layouts (as distributed):

    GTA5        root/images/00001.png, root/labels/00001.png (label ids, palette or grey PNG)
    SYNTHIA     root/RGB/0000000.png, root/GT/LABELS/0000000.png (16-bit, class id in channel 0)
    Cityscapes  root/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png
                root/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png (label ids, grey PNG)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.classes import (
    CLASS_NAMES,
    LABEL_TO_TRAIN,
    NUM_CLASSES,
    NUM_LABEL_IDS,
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


DATASETS: dict[str, type[_PairDataset]] = {
    "gta5": Gta5Dataset,
    "synthia": SynthiaDataset,
    "cityscapes": CityscapesDataset,
}
