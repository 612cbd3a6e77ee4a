"""Each loader on a tiny folder fabricated in that dataset's exact layout."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration.classes import IGNORE_INDEX, LABEL_TO_TRAIN, TRAIN_ID
from training.data.datasets import CityscapesDataset, DatasetError, Gta5Dataset, Sample, SynthiaDataset
from training.data.png16 import write_png16

H, W = 6, 10


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label_ids(seed: int, h: int = H, w: int = W) -> np.ndarray:
    # all 34 Cityscapes label ids can appear
    return np.random.default_rng(seed + 100).integers(0, 34, (h, w), dtype=np.uint8)


def make_gta5(root: Path, n: int = 3, palette: bool = True) -> list[np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    labels = []
    for i in range(n):
        Image.fromarray(_image(i)).save(root / "images" / f"{i + 1:05d}.png")
        ids = _label_ids(i)
        lab = Image.fromarray(ids, mode="L")
        if palette:  # GTA5 ships palette PNGs
            lab = lab.convert("P")
            lab.putpalette(list(range(256)) * 3)
        lab.save(root / "labels" / f"{i + 1:05d}.png")
        labels.append(ids)
    return labels


def make_cityscapes(root: Path, split: str = "val") -> dict[str, np.ndarray]:
    out = {}
    for k, (city, seq) in enumerate((("frankfurt", 0), ("frankfurt", 1), ("lindau", 0))):
        stem = f"{city}_{seq:06d}_000019"
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(k)).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        ids = _label_ids(k)
        Image.fromarray(ids, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        # distractors that a real gtFine folder holds next to the label ids
        Image.fromarray(ids, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
        out[stem] = ids
    return out


def make_synthia(root: Path) -> list[np.ndarray]:
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    ids_all = []
    for i in range(2):
        Image.fromarray(_image(i)).save(root / "RGB" / f"{i:07d}.png")
        rng = np.random.default_rng(i)
        ids = rng.integers(0, 23, (H, W), dtype=np.uint16)
        instance = rng.integers(0, 65536, (H, W), dtype=np.uint16)  # high values: Pillow would mangle them
        write_png16(
            root / "GT" / "LABELS" / f"{i:07d}.png", np.stack([ids, instance, np.zeros_like(ids)], -1), 4
        )
        ids_all.append(ids)
    return ids_all


def test_gta5_reads_images_and_maps_label_ids(tmp_path):
    labels = make_gta5(tmp_path)
    ds = Gta5Dataset(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 19
    s = ds[1]
    assert isinstance(s, Sample) and s.name == "00002"
    assert s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
    assert np.array_equal(s.image, _image(1))
    assert s.label.dtype == np.uint8
    assert np.array_equal(s.label, LABEL_TO_TRAIN[labels[1]])
    assert np.array_equal(ds.label(1), s.label)
    assert set(np.unique(s.label)) <= set(range(19)) | {IGNORE_INDEX}


def test_gta5_grey_labels_too(tmp_path):
    labels = make_gta5(tmp_path, palette=False)
    assert np.array_equal(Gta5Dataset(tmp_path)[0].label, LABEL_TO_TRAIN[labels[0]])


def test_resize_on_load_image_bilinear_label_nearest(tmp_path):
    labels = make_gta5(tmp_path)
    s = Gta5Dataset(tmp_path, size=(3, 5))[0]
    assert s.image.shape == (3, 5, 3) and s.label.shape == (3, 5)
    assert set(np.unique(s.label)) <= set(np.unique(LABEL_TO_TRAIN[labels[0]]))  # no new ids


def test_cityscapes_split_layout(tmp_path):
    truth = make_cityscapes(tmp_path, "val")
    ds = CityscapesDataset(tmp_path, "val")
    assert [p[2] for p in ds.pairs] == sorted(truth)
    for i in range(len(ds)):
        s = ds[i]
        assert np.array_equal(s.label, LABEL_TO_TRAIN[truth[s.name]])
    with pytest.raises(DatasetError, match=r"leftImg8bit/train: expected the Cityscapes image folder"):
        CityscapesDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split: expected one of"):
        CityscapesDataset(tmp_path, "training")


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_synthia_16_bit_labels(tmp_path, num_classes):
    from calibration.classes import synthia_lut

    ids = make_synthia(tmp_path)
    ds = SynthiaDataset(tmp_path, num_classes=num_classes)
    assert ds.num_classes == num_classes and len(ds.class_names) == num_classes
    s = ds[0]
    assert np.array_equal(s.label, synthia_lut(num_classes)[ids[0]])
    if num_classes == 19:
        assert np.array_equal(s.label[ids[0] == 3], np.full((ids[0] == 3).sum(), TRAIN_ID["road"]))
        assert np.all(s.label[ids[0] == 0] == IGNORE_INDEX)
    assert s.label.max() < num_classes or s.label.max() == IGNORE_INDEX


def test_synthia_grey_16_bit_labels(tmp_path):
    make_synthia(tmp_path)
    ids = np.full((H, W), 8, dtype=np.uint16)  # car
    write_png16(tmp_path / "GT" / "LABELS" / "0000000.png", ids)
    assert np.all(SynthiaDataset(tmp_path)[0].label == TRAIN_ID["car"])


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"nope: expected the GTA5 root folder"):
        Gta5Dataset(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"images: expected GTA5 images .* empty"):
        Gta5Dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"RGB: expected a folder of SYNTHIA images"):
        SynthiaDataset(tmp_path)


def test_image_without_label(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(DatasetError, match=r"labels/00002.png: expected the label of image 00002.png"):
        Gta5Dataset(tmp_path)


def test_label_of_wrong_size(tmp_path):
    make_gta5(tmp_path)
    Image.fromarray(_label_ids(0, H + 1, W), mode="L").save(tmp_path / "labels" / "00001.png")
    with pytest.raises(DatasetError, match=r"00001.png: expected a label of the image's size 6x10, got 7x10"):
        Gta5Dataset(tmp_path)[0]
    assert Gta5Dataset(tmp_path, size=(4, 4))[0].label.shape == (4, 4)  # resizing both is fine


def test_label_of_wrong_mode(tmp_path):
    make_gta5(tmp_path)
    Image.fromarray(_image(0)).save(tmp_path / "labels" / "00003.png")
    with pytest.raises(
        DatasetError, match=r"00003.png: expected a single-channel label PNG \(mode L or P\), got mode RGB"
    ):
        Gta5Dataset(tmp_path)[2]


def test_unknown_label_ids(tmp_path):
    truth = make_cityscapes(tmp_path)
    stem = sorted(truth)[0]
    bad = truth[stem].copy()
    bad[0, 0], bad[1, 1] = 40, 200
    city = stem.split("_")[0]
    Image.fromarray(bad, mode="L").save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    with pytest.raises(
        DatasetError, match=r"expected Cityscapes label ids in 0..33, got unknown ids 40, 200"
    ):
        CityscapesDataset(tmp_path, "val")[0]


def test_unknown_synthia_ids(tmp_path):
    make_synthia(tmp_path)
    write_png16(tmp_path / "GT" / "LABELS" / "0000001.png", np.full((H, W, 3), 300, dtype=np.uint16))
    with pytest.raises(
        DatasetError, match=r"0000001.png: expected SYNTHIA class ids in 0..22, got unknown ids 300"
    ):
        SynthiaDataset(tmp_path)[1]


def test_index_out_of_range(tmp_path):
    make_gta5(tmp_path)
    with pytest.raises(IndexError):
        Gta5Dataset(tmp_path)[3]
