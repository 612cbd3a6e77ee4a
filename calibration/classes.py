"""The 19 Cityscapes evaluation classes (the label convention shared by training, bundles and the service), their ids and palette, and the SYNTHIA mapping onto them.

Cityscapes stores *label ids* (0..33) in its `gtFine_labelIds` PNGs and GTA5 uses the same ids; the 19
evaluated classes get *train ids* 0..18, everything else maps to the ignore index. SYNTHIA-RAND-CITYSCAPES has
its own ids (README of the dataset); the mapping below is the one of DAFormer and the common UDA code, and the
16- and 13-class subsets are the usual SYNTHIA→Cityscapes evaluation protocols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.labels import IGNORE_INDEX

NUM_CLASSES = 19


@dataclass(frozen=True)
class CityscapesClass:
    name: str
    train_id: int
    label_id: int
    color: tuple[int, int, int]


CLASSES: tuple[CityscapesClass, ...] = (
    CityscapesClass("road", 0, 7, (128, 64, 128)),
    CityscapesClass("sidewalk", 1, 8, (244, 35, 232)),
    CityscapesClass("building", 2, 11, (70, 70, 70)),
    CityscapesClass("wall", 3, 12, (102, 102, 156)),
    CityscapesClass("fence", 4, 13, (190, 153, 153)),
    CityscapesClass("pole", 5, 17, (153, 153, 153)),
    CityscapesClass("traffic light", 6, 19, (250, 170, 30)),
    CityscapesClass("traffic sign", 7, 20, (220, 220, 0)),
    CityscapesClass("vegetation", 8, 21, (107, 142, 35)),
    CityscapesClass("terrain", 9, 22, (152, 251, 152)),
    CityscapesClass("sky", 10, 23, (70, 130, 180)),
    CityscapesClass("person", 11, 24, (220, 20, 60)),
    CityscapesClass("rider", 12, 25, (255, 0, 0)),
    CityscapesClass("car", 13, 26, (0, 0, 142)),
    CityscapesClass("truck", 14, 27, (0, 0, 70)),
    CityscapesClass("bus", 15, 28, (0, 60, 100)),
    CityscapesClass("train", 16, 31, (0, 80, 100)),
    CityscapesClass("motorcycle", 17, 32, (0, 0, 230)),
    CityscapesClass("bicycle", 18, 33, (119, 11, 32)),
)

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
TRAIN_ID: dict[str, int] = {c.name: c.train_id for c in CLASSES}
PALETTE: np.ndarray = np.array([c.color for c in CLASSES], dtype=np.uint8)  # (19, 3)

# Cityscapes label ids 0..33 are all defined (most map to ignore); -1 (license plate) never appears in PNGs.
NUM_LABEL_IDS = 34


def _label_to_train_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in CLASSES:
        lut[c.label_id] = c.train_id
    return lut


LABEL_TO_TRAIN: np.ndarray = _label_to_train_lut()  # (256,) uint8: Cityscapes/GTA5 label id -> train id
TRAIN_TO_LABEL: np.ndarray = np.zeros(256, dtype=np.uint8)  # (256,) uint8: train id -> label id, ignore -> 0
TRAIN_TO_LABEL[[c.train_id for c in CLASSES]] = [c.label_id for c in CLASSES]

# SYNTHIA-RAND-CITYSCAPES class ids (first channel of GT/LABELS/*.png) -> Cityscapes train ids.
# Ids 0 (void), 13 (parking slot), 14 (road work) and 22 (lane marking) map to ignore.
SYNTHIA_NUM_IDS = 23
SYNTHIA_TO_TRAIN: dict[int, int] = {
    3: 0,  # road
    4: 1,  # sidewalk
    2: 2,  # building
    21: 3,  # wall
    5: 4,  # fence
    7: 5,  # pole
    15: 6,  # traffic light
    9: 7,  # traffic sign
    6: 8,  # vegetation
    16: 9,  # terrain (absent from SYNTHIA in practice)
    1: 10,  # sky
    10: 11,  # pedestrian -> person
    17: 12,  # rider
    8: 13,  # car
    18: 14,  # truck (absent in practice)
    19: 15,  # bus
    20: 16,  # train (absent in practice)
    12: 17,  # motorcycle
    11: 18,  # bicycle
}

# Evaluation subsets, as train ids of the 19 classes, in order.
SYNTHIA_16_TRAIN_IDS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_TRAIN_IDS: tuple[int, ...] = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SUBSETS: dict[int, tuple[int, ...]] = {
    19: tuple(range(NUM_CLASSES)),
    16: SYNTHIA_16_TRAIN_IDS,
    13: SYNTHIA_13_TRAIN_IDS,
}


def subset_lut(num_classes: int) -> np.ndarray:
    """(256,) uint8 mapping a 19-class train id to its index in the `num_classes` subset, others to ignore."""
    if num_classes not in SUBSETS:
        raise ValueError(f"num_classes: expected one of {sorted(SUBSETS)}, got {num_classes}")
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(SUBSETS[num_classes])] = np.arange(num_classes, dtype=np.uint8)
    return lut


def synthia_lut(num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(65536,) uint8: SYNTHIA id -> class index among `num_classes` (19, 16 or 13); unknown -> ignore."""
    to_subset = subset_lut(num_classes)
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for synthia_id, train_id in SYNTHIA_TO_TRAIN.items():
        lut[synthia_id] = to_subset[train_id]
    return lut


def subset_names(num_classes: int) -> tuple[str, ...]:
    if num_classes not in SUBSETS:
        raise ValueError(f"num_classes: expected one of {sorted(SUBSETS)}, got {num_classes}")
    return tuple(CLASS_NAMES[i] for i in SUBSETS[num_classes])


def colorize(train_ids: np.ndarray, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 Cityscapes colours; ignore and unknown ids get `ignore_color`."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[:NUM_CLASSES] = PALETTE
    return lut[train_ids.astype(np.uint8)]
