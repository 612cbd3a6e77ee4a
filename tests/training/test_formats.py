"""Datasets as configuration: every format through `blda train` on folders written in its exact layout, the
SYNTHIA-layout synthetic source end to end (synth -> train -> evaluate --classes 16), and the opener's
errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from calibration.classes import CLASSES, SYNTHIA_TO_TRAIN
from training.config import DATA_FORMATS, ConfigError, DataConfig, data_config, load_config
from training.data.datasets import FORMATS
from training.data.png16 import write_png16
from training.datasets import open_domains, open_split

H, W = 32, 64
# The settings that make 2 iterations of a tiny network on 32x64 images take a second.
TINY = [
    "model.network=mobilenet_lraspp_tiny",
    "optim.iterations=2",
    "optim.warmup_iters=1",
    "data.crop_height=32",
    "data.crop_width=64",
    "data.scale_min=1",
    "data.scale_max=1",
    "data.eval_scale=1",
    "data.rcs_min_pixels=1",
    "log.progress=false",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scene(seed: int, num_classes: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image and (H, W) train ids of 8x8 blocks whose colour follows the class."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, num_classes, size=(H // 8, W // 8))
    train = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    colours = (np.arange(num_classes)[:, None] * np.array([13, 29, 47]) + 20) % 256
    image = colours[train].astype(np.uint8)
    return image, train


_TRAIN_TO_LABEL_ID = np.array([c.label_id for c in CLASSES], dtype=np.uint8)
_TRAIN_TO_SYNTHIA = np.zeros(19, dtype=np.uint16)
for _synthia, _train in SYNTHIA_TO_TRAIN.items():
    _TRAIN_TO_SYNTHIA[_train] = _synthia


def write_gta5(root: Path, n: int, seed: int) -> None:
    """root/images/00001.png, root/labels/00001.png (Cityscapes label ids, palette PNG)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        image, train = _scene(seed + i)
        Image.fromarray(image).save(root / "images" / f"{i + 1:05d}.png")
        label = Image.fromarray(_TRAIN_TO_LABEL_ID[train], mode="L").convert("P")
        label.putpalette(list(range(256)) * 3)
        label.save(root / "labels" / f"{i + 1:05d}.png")


def write_synthia(root: Path, n: int, seed: int) -> None:
    """root/RGB/0000000.png, root/GT/LABELS/0000000.png (16-bit RGB, SYNTHIA id in channel 0)."""
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    for i in range(n):
        image, train = _scene(seed + i)
        Image.fromarray(image).save(root / "RGB" / f"{i:07d}.png")
        ids = _TRAIN_TO_SYNTHIA[train]
        instance = np.full_like(ids, 40000)  # > 255: Pillow's 8-bit reading would mangle the file
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", np.stack([ids, instance, instance], -1), 1)


def write_cityscapes(root: Path, counts: dict[str, int], seed: int) -> None:
    """root/leftImg8bit/{split}/{city}/*_leftImg8bit.png, root/gtFine/{split}/{city}/*_gtFine_labelIds.png."""
    for split, n in counts.items():
        for i in range(n):
            city = ("aachen", "bremen")[i % 2] if split == "train" else "lindau"
            stem = f"{city}_{i:06d}_000019"
            for kind in ("leftImg8bit", "gtFine"):
                (root / kind / split / city).mkdir(parents=True, exist_ok=True)
            image, train = _scene(seed + 100 * (split == "val") + i)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            label = Image.fromarray(_TRAIN_TO_LABEL_ID[train], mode="L")
            label.save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def write_folder(
    root: Path, n: int, seed: int, num_classes: int = 19, classes: dict | None = None, val: int = 0
) -> None:
    """root/images/<stem>.jpg|png, root/labels/<stem>.png (train ids, 255 = ignore), optional classes.json
    and splits/{train,val}.txt (the last `val` stems are val)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    stems = [f"frame_{i:03d}" for i in range(n)]
    for i, stem in enumerate(stems):
        image, train = _scene(seed + i, num_classes)
        train[:2] = 255
        Image.fromarray(image).save(root / "images" / f"{stem}{'.jpg' if i % 2 else '.png'}", quality=95)
        stored = train if classes is None or "ids" not in classes else (train + 10).astype(np.uint8)
        stored[train == 255] = 255
        Image.fromarray(stored, mode="L").save(root / "labels" / f"{stem}.png")
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    if val:
        (root / "splits").mkdir()
        (root / "splits" / "train.txt").write_text("\n".join(stems[:-val]) + "\n")
        (root / "splits" / "val.txt").write_text("# held out\n" + "\n".join(stems[-val:]) + "\n")


def _layout(data: Path, source_format: str, target_format: str) -> tuple[list[str], int]:
    """Write a data root with the source and target in the given formats; returns the `--set` items and the
    number of classes of the data."""
    num_classes = 19
    if source_format == "gta5":
        write_gta5(data / "source", 4, 0)
    elif source_format == "synthia":
        write_synthia(data / "source", 4, 0)
    elif source_format == "cityscapes":
        write_cityscapes(data / "source", {"train": 4, "val": 1}, 0)
    if target_format == "cityscapes":
        write_cityscapes(data / "target", {"train": 4, "val": 2}, 50)
    if "folder" in (source_format, target_format):
        # Own classes with raw ids 10..13 mapped to train ids 0..3; the target split by list files.
        num_classes = 4
        classes = {
            "names": ["ground", "wall", "sky", "thing"],
            "colors": [[128, 64, 128], [102, 102, 156], [70, 130, 180], [220, 20, 60]],
            "ids": {str(10 + k): k for k in range(4)},
        }
        write_folder(data / "mine_src", 4, 0, 4, classes)
        write_folder(data / "mine_tgt", 6, 50, 4, classes, val=2)
    items = [f"data.source_format={source_format}", f"data.target_format={target_format}"]
    if source_format == "folder":
        items += ["data.source=mine_src", "data.target=mine_tgt", f"model.num_classes={num_classes}"]
    return items, num_classes


def _train(data: Path, out: Path, items: list[str], arm: str = "source-only") -> Result:
    from blda.cli import app

    args = ["train", "--arm", arm, "--data", str(data), "--out", str(out)]
    for item in [*TINY, *items]:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def test_the_config_lists_every_format() -> None:
    assert list(DATA_FORMATS) == list(FORMATS)


@pytest.mark.parametrize(
    ("source_format", "target_format"),
    [("gta5", "cityscapes"), ("synthia", "cityscapes"), ("cityscapes", "cityscapes"), ("folder", "folder")],
)
def test_each_format_trains_through_blda_train(
    source_format: str, target_format: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    items, num_classes = _layout(data, source_format, target_format)
    result = _train(data, tmp_path / "run", items)
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["iteration"] == 2 and len(ev["iou"]) == num_classes
    assert ev["images"] == 2  # the target val split of this layout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["source_format"] == source_format
    assert saved["data"]["target_format"] == target_format


def test_synthia_source_reads_synthia_ids_not_pillows_bytes(tmp_path: Path) -> None:
    write_synthia(tmp_path / "source", 2, 7)
    sample = open_split(tmp_path, "source", "train", DataConfig(source_format="synthia"))[0]
    _, train = _scene(7)
    np.testing.assert_array_equal(sample.label, train)


def test_folder_classes_map_raw_ids_and_lists_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    items, _ = _layout(data, "folder", "folder")
    cfg = load_config("source-only", overrides=[*items, "data.tuning_fraction=0.25"])
    sets = open_domains(data, cfg.data)
    val = sets["target_val"]
    assert [val.pairs[i][2] for i in range(len(val))] == ["frame_004", "frame_005"]
    assert val.class_names == ("ground", "wall", "sky", "thing")
    _, train = _scene(50 + 4, 4)
    train[:2] = 255
    np.testing.assert_array_equal(val[0].label, train)
    # splits/train.txt lists 4 stems; the tuning split takes every 4th of them
    assert [s.name for s in sets["target_tuning"]] == ["frame_003"] and len(sets["target_train"]) == 3


def test_folder_classes_must_match_the_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    items, _ = _layout(data, "folder", "folder")
    result = _train(data, tmp_path / "run", [i for i in items if not i.startswith("model.num_classes")])
    assert result.exit_code == 2
    assert "model.num_classes: expected 4" in result.output and "got 19" in result.output


def test_unknown_format_names_the_key_and_the_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.source_format: expected one of \['gta5', 'synthia', "):
        load_config("source-only", overrides=["data.source_format=gta"])
    with pytest.raises(ConfigError, match=r"data.target_format: expected one of .*got 'coco'"):
        data_config({"target_format": "coco"})
    with pytest.raises(ValueError, match=r"data.target_format: expected one of \['cityscapes', 'folder'"):
        open_split(tmp_path, "target", "val", DataConfig(target_format="coco"))


def test_data_config_reads_a_stored_config_then_overrides() -> None:
    stored = {"source_format": "synthia", "source": "syn", "crop_height": 64}
    cfg = data_config(stored, ["data.target=cs", "val_fraction=0.5"])
    assert (cfg.source_format, cfg.source, cfg.target, cfg.val_fraction) == ("synthia", "syn", "cs", 0.5)
    assert cfg.crop_height == 64 and cfg.target_format == "cityscapes"
    with pytest.raises(ConfigError, match=r"data\.val_fraction: expected a number"):
        data_config(None, ["val_fraction=half"])


def test_synthia_layout_synth_runs_end_to_end(tmp_path: Path) -> None:
    """`blda synth --source-layout synthia` -> `blda train --set data.source_format=synthia` (BLDA arm) ->
    `blda evaluate --classes 16`, which reads the formats from the checkpoint."""
    from blda.cli import app

    data = tmp_path / "syn"
    runner = CliRunner()
    synth = ["synth", "--out", str(data), "--count", "4", "--target-count", "4", "--val-count", "2"]
    synth += ["--source-val-count", "1", "--height", "32", "--width", "64", "--workers", "1"]
    result = runner.invoke(app, [*synth, "--source-layout", "synthia"])
    assert result.exit_code == 0, result.output
    assert (data / "source" / "RGB" / "0000000.png").is_file()
    assert (data / "source" / "GT" / "LABELS" / "0000000.png").is_file()
    assert not (data / "source" / "images").exists()

    blda = ["data.source_format=synthia", "self_training.start_iter=0", "blda.start_iter=1"]
    blda += ["blda.table_every=1", "blda.min_pixels=1", "self_training.adabn_images=2"]
    result = _train(data, tmp_path / "run", blda, arm="blda")
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "run" / "checkpoint.pt"

    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, [*args, "--threads", "1", "--classes", "16", "--tau", "0", "--source"])
    assert result.exit_code == 0, result.output
    assert "mIoU over 16 classes" in " ".join(result.output.split())  # rich wraps the title
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_config"]["source_format"] == "synthia"  # from the checkpoint
    assert metrics["classes_averaged"] == 16 and metrics["source"]["num_images"] == 1
    raw = metrics["target"]["raw"]
    assert raw["miou"] == raw["miou_by_classes"]["16"]
    assert set(raw["miou_by_classes"]) == {"19", "16", "13"}

    bad = runner.invoke(app, [*args, "--classes", "15", "--tau", "0"])
    assert bad.exit_code == 2 and "--classes: expected one of [13, 16, 19], got 15" in bad.stderr
    wrong = runner.invoke(app, [*args, "--tau", "0", "--source", "--source-format", "gta5"])
    assert wrong.exit_code == 2 and "GTA5" in wrong.stderr  # the option wins over the checkpoint
