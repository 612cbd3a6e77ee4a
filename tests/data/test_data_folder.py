"""The folder format: images/ and labels/ matched by stem, classes.json, splits by list or fraction, and
errors that name the file and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration.classes import CLASS_NAMES
from training.data.datasets import FORMATS, DatasetError, FolderDataset, hold_out, open_dataset

H, W = 6, 10


def _write(root: Path, stems: list[str], labels: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    out = {}
    for i, stem in enumerate(stems):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        label = labels[stem] if labels else rng.integers(0, 19, (H, W), dtype=np.uint8)
        Image.fromarray(label, mode="L").save(root / "labels" / f"{stem}.png")
        out[stem] = label
    return out


def test_pairs_by_stem_with_train_ids_and_ignore(tmp_path: Path) -> None:
    label = np.full((H, W), 255, np.uint8)
    label[:, :3] = 18
    written = _write(tmp_path, ["b", "a"], {"a": label, "b": np.zeros((H, W), np.uint8)})
    ds = FolderDataset(tmp_path)
    assert [ds[i].name for i in range(len(ds))] == ["a", "b"] and ds.class_names == CLASS_NAMES
    np.testing.assert_array_equal(ds[0].label, written["a"])
    np.testing.assert_array_equal(ds.label(1), written["b"])
    assert ds[0].image.shape == (H, W, 3)


def test_unmatched_files_are_named_with_a_count(tmp_path: Path) -> None:
    _write(tmp_path, [f"im{i}" for i in range(8)])
    for i in range(7):  # seven images lose their label, one label loses its image
        (tmp_path / "labels" / f"im{i}.png").unlink()
    (tmp_path / "labels" / "orphan.png").write_bytes((tmp_path / "labels" / "im7.png").read_bytes())
    with pytest.raises(DatasetError) as err:
        FolderDataset(tmp_path)
    message = str(err.value)
    assert "expected images/ and labels/ to match by file stem, got 8 unmatched" in message
    assert "images/im0.png (no label)" in message and "(and 3 more)" in message
    assert "labels/orphan.png (no image)" not in message  # beyond the first five
    (tmp_path / "images" / "im0.png").unlink()
    with pytest.raises(DatasetError, match=r"got 7 unmatched: images/im1\.png"):
        FolderDataset(tmp_path)


def test_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope: expected a folder with images/ and labels/"):
        FolderDataset(tmp_path / "nope")
    _write(tmp_path, ["a"])
    for f in (tmp_path / "labels").iterdir():
        f.unlink()
    (tmp_path / "labels").rmdir()
    with pytest.raises(DatasetError, match=r"labels: expected a folder of label PNGs"):
        FolderDataset(tmp_path)


def test_ids_beyond_the_classes_are_an_error(tmp_path: Path) -> None:
    _write(tmp_path, ["a"], {"a": np.full((H, W), 19, np.uint8)})
    with pytest.raises(DatasetError, match=r"a\.png: expected train ids in 0\.\.18 or 255 \(ignore\), got 19"):
        FolderDataset(tmp_path)[0]


def test_classes_file_names_colours_and_id_mapping(tmp_path: Path) -> None:
    raw = np.array([[7, 8, 9, 200, 255]] * 2, dtype=np.uint8)
    _write(tmp_path, ["a"], {"a": raw})
    spec = {"names": ["road", "person"], "colors": [[1, 2, 3], [4, 5, 6]], "ids": {"7": 0, "8": 1, "9": 255}}
    (tmp_path / "classes.json").write_text(json.dumps(spec))
    ds = FolderDataset(tmp_path)
    assert ds.class_names == ("road", "person") and ds.num_classes == 2
    assert ds.classes.colors == ((1, 2, 3), (4, 5, 6))
    # mapped ids become train ids; unmapped raw ids (200) and 255 are ignored
    np.testing.assert_array_equal(ds.label(0), np.array([[0, 1, 255, 255, 255]] * 2))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"names": []}, "names: expected a non-empty list of strings"),
        ({"names": ["a"], "colors": [[1, 2]]}, r"colors: expected 1 \[r, g, b\] lists"),
        ({"names": ["a"], "ids": {"x": 0}}, r"ids: expected raw ids in 0\.\.255, got 'x'"),
        ({"names": ["a"], "ids": {"3": 1}}, r"ids\.3: expected a train id in 0\.\.0 or 255, got 1"),
        ({"names": ["a"], "labels": []}, r"expected keys among \['colors', 'ids', 'names'\], got \['labels'\]"),
    ],
)
def test_bad_classes_file_names_the_field(tmp_path: Path, spec: dict, needle: str) -> None:
    _write(tmp_path, ["a"])
    (tmp_path / "classes.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=needle) as err:
        FolderDataset(tmp_path)
    assert "classes.json" in str(err.value)


def test_split_by_list_files(tmp_path: Path) -> None:
    _write(tmp_path, ["a", "b", "c"])
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("c\n# comment\n\na.png\n")
    (tmp_path / "splits" / "val.txt").write_text("b\n")
    assert [s.name for s in FolderDataset(tmp_path, "train")] == ["c", "a"]
    assert [s.name for s in FolderDataset(tmp_path, "val")] == ["b"]
    (tmp_path / "splits" / "val.txt").write_text("b\nzz\nyy\n")
    with pytest.raises(DatasetError, match=r"val\.txt: expected stems of matched .* got 2 unknown: zz, yy"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "splits" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"val\.txt: expected the list of val stems"):
        FolderDataset(tmp_path, "val")


def test_split_by_fraction_is_disjoint_and_complete(tmp_path: Path) -> None:
    stems = [f"s{i:02d}" for i in range(10)]
    _write(tmp_path, stems)
    train = [s.name for s in FolderDataset(tmp_path, "train", val_fraction=0.2)]
    val = [s.name for s in FolderDataset(tmp_path, "val", val_fraction=0.2)]
    assert val == ["s04", "s09"] and sorted(train + val) == stems
    assert [s.name for s in FolderDataset(tmp_path, "train")] == stems  # no fraction: all train
    with pytest.raises(DatasetError, match=r"expected splits/val\.txt or a val fraction > 0"):
        FolderDataset(tmp_path, "val")


def test_hold_out_every_kth() -> None:
    kept, held = hold_out(10, 0.3)
    assert held == [2, 5, 8] and sorted(kept + held) == list(range(10))
    assert hold_out(1, 0.5) == ([0], [])


def test_open_dataset_lists_the_formats(tmp_path: Path) -> None:
    assert sorted(FORMATS) == ["cityscapes", "folder", "gta5", "synthia"]
    with pytest.raises(ValueError, match=r"format: expected one of \['cityscapes', 'folder', 'gta5', 'synthia'\]"):
        open_dataset("coco", tmp_path, "train")
    _write(tmp_path / "d", ["a"])
    assert len(open_dataset("folder", tmp_path / "d", "train")) == 1
    # split-less layouts keep val in the <folder>_val sibling
    with pytest.raises(DatasetError, match=r"d_val: expected the GTA5 root folder"):
        open_dataset("gta5", tmp_path / "d", "val")
