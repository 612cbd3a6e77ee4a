"""The generator: determinism, layouts readable by the loaders, valid ids, the configured domain shift."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from calibration.classes import CLASSES, NUM_LABEL_IDS, TRAIN_ID
from training.data.datasets import CityscapesDataset, Gta5Dataset
from training.data.sampling import class_pixel_counts
from training.data.synth.config import (
    SOURCE_LABELS,
    SOURCE_STYLE,
    TARGET_LABELS,
    TARGET_STYLE,
    SceneConfig,
    ShiftConfig,
    SynthConfig,
    domain_configs,
    lerp_config,
)
from training.data.synth.writer import generate, render_one

TINY = SceneConfig(height=48, width=96)


def _config(**kw) -> SynthConfig:
    base = {
        "scene": TINY,
        "seed": 3,
        "source_count": 3,
        "target_count": 2,
        "val_count": 2,
        "source_val_count": 1,
    }
    base.update(kw)
    return SynthConfig(**base)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    generate(_config(), tmp_path / "a", workers=1)
    generate(_config(), tmp_path / "b", workers=2)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) == 2 * (3 + 1 + 2 + 2)
    assert a == b


def test_different_seed_different_images():
    img0, lab0 = render_one(_config(seed=0), "source", "train", 0)
    img1, lab1 = render_one(_config(seed=1), "source", "train", 0)
    assert not np.array_equal(img0, img1) and not np.array_equal(lab0, lab1)
    # and different indices of one seed differ too
    assert not np.array_equal(render_one(_config(seed=0), "source", "train", 1)[0], img0)


def test_layouts_are_readable_by_the_loaders(tmp_path):
    info = generate(_config(), tmp_path, workers=1)
    src = Gta5Dataset(tmp_path / "source")
    src_val = Gta5Dataset(tmp_path / "source_val")
    tgt = CityscapesDataset(tmp_path / "target", "train")
    val = CityscapesDataset(tmp_path / "target", "val")
    assert (len(src), len(src_val), len(tgt), len(val)) == (3, 1, 2, 2)
    for ds in (src, src_val, tgt, val):
        s = ds[0]
        assert s.image.shape == (48, 96, 3) and s.label.shape == (48, 96)
    assert val[0].name.startswith("frankfurt_000000_000019")
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["seed"] == 3 and meta["counts"]["target_val"] == 2
    assert meta == json.loads(json.dumps(info))
    assert set(meta["class_frequencies"]) == {"source/train", "source/val", "target/train", "target/val"}


def test_label_ids_are_valid_cityscapes_ids():
    for domain in ("source", "target"):
        for i in range(3):
            _, ids = render_one(_config(), domain, "train", i)
            assert ids.dtype == np.uint8
            assert int(ids.max()) < NUM_LABEL_IDS
            # Only the 19 classes and the ego vehicle (1, the target's ignored bonnet) are ever drawn.
            assert set(np.unique(ids)) <= {1} | {c.label_id for c in CLASSES}


def _frequencies(config: SynthConfig, domain: str, n: int) -> np.ndarray:
    from calibration.classes import LABEL_TO_TRAIN

    total = np.zeros(19, dtype=np.int64)
    for i in range(n):
        total += class_pixel_counts(LABEL_TO_TRAIN[render_one(config, domain, "train", i)[1]])
    return total / total.sum()


def _counts_with(config: SynthConfig, domain: str, n: int, classes: list[int]) -> np.ndarray:
    """How many images contain each class (robust to the size of single objects)."""
    from calibration.classes import LABEL_TO_TRAIN

    seen = np.zeros(len(classes))
    for i in range(n):
        lab = LABEL_TO_TRAIN[render_one(config, domain, "train", i)[1]]
        seen += [np.any(lab == c) for c in classes]
    return seen


def test_label_distribution_shifts_in_the_configured_direction():
    config = _config(scene=SceneConfig(height=64, width=128))
    n = 24
    fs, ft = _frequencies(config, "source", n), _frequencies(config, "target", n)
    assert fs[TRAIN_ID["car"]] > ft[TRAIN_ID["car"]]
    for name in ("rider", "bicycle", "pole"):
        assert ft[TRAIN_ID[name]] > fs[TRAIN_ID[name]], name
    two_wheelers = [TRAIN_ID["rider"], TRAIN_ID["bicycle"], TRAIN_ID["motorcycle"], TRAIN_ID["person"]]
    assert (
        _counts_with(config, "target", n, two_wheelers).sum()
        > _counts_with(config, "source", n, two_wheelers).sum()
    )


def test_shift_strength_zero_makes_the_domains_identical_in_distribution():
    source, target = domain_configs(ShiftConfig(strength=0.0))
    assert target.style == source.style and target.labels == source.labels
    _, target1 = domain_configs(ShiftConfig(strength=1.0))
    assert target1.style == TARGET_STYLE and target1.labels == TARGET_LABELS
    _, half = domain_configs(ShiftConfig(strength=0.5, labels=0.0))
    assert half.labels == SOURCE_LABELS
    assert half.style.jpeg_quality == pytest.approx(
        (SOURCE_STYLE.jpeg_quality + TARGET_STYLE.jpeg_quality) / 2
    )


def test_extrapolated_shift_stays_valid():
    _, hard = domain_configs(ShiftConfig(strength=3.0))
    assert 5.0 <= hard.style.jpeg_quality <= 100.0
    assert 0.0 <= hard.labels.fence_prob <= 1.0 and hard.labels.ego_hood_prob <= 1.0
    assert all(c >= 0 for rgb in hard.style.class_colors for c in rgb)
    img, _ = render_one(_config(shift=ShiftConfig(strength=3.0)), "target", "train", 0)
    assert img.shape == (48, 96, 3)


def test_lerp_is_fieldwise():
    mid = lerp_config(SOURCE_LABELS, TARGET_LABELS, 0.5)
    for f in dataclasses.fields(mid):
        a, b = getattr(SOURCE_LABELS, f.name), getattr(TARGET_LABELS, f.name)
        assert getattr(mid, f.name) == pytest.approx((a + b) / 2), f.name


def test_config_validation():
    with pytest.raises(ValueError, match=r"ShiftConfig.strength: expected a value in \[0, 3\], got -1"):
        ShiftConfig(strength=-1)
    with pytest.raises(ValueError, match=r"SynthConfig\.val_count: expected >= 0, got -2"):
        SynthConfig(val_count=-2)


def test_synthia_layout_writes_16_bit_synthia_ids_of_its_16_classes(tmp_path):
    from calibration.classes import SYNTHIA_16_TRAIN_IDS, SYNTHIA_TO_TRAIN
    from training.data.datasets import SynthiaDataset
    from training.data.png16 import png_header, read_png16

    info = generate(_config(source_layout="synthia"), tmp_path / "syn", workers=1)
    generate(_config(), tmp_path / "gta", workers=1)
    src = tmp_path / "syn" / "source"
    assert sorted(p.name for p in (src / "RGB").iterdir()) == ["0000000.png", "0000001.png", "0000002.png"]
    assert [p.name for p in (tmp_path / "syn" / "source_val" / "GT" / "LABELS").iterdir()] == ["0000000.png"]
    label_file = src / "GT" / "LABELS" / "0000001.png"
    assert png_header(label_file)[2:] == (16, 2)  # 16-bit RGB, as SYNTHIA ships
    stored = read_png16(label_file)
    assert (stored[..., 1:] == 0).all()
    ids = set(np.unique(stored[..., 0]).tolist())
    synthia_of = {t: s for s, t in SYNTHIA_TO_TRAIN.items()}
    allowed = {0} | {synthia_of[t] for t in SYNTHIA_16_TRAIN_IDS}
    assert ids <= allowed and len(ids) > 3
    # Same scene as the GTA5 layout; the classes SYNTHIA lacks (terrain, truck, train) became void.
    gta = Gta5Dataset(tmp_path / "gta" / "source")[1].label
    syn = SynthiaDataset(src)[1].label
    expected = np.where(np.isin(gta, SYNTHIA_16_TRAIN_IDS), gta, 255)
    np.testing.assert_array_equal(syn, expected)
    assert (gta == TRAIN_ID["terrain"]).any() or (gta == TRAIN_ID["truck"]).any()  # something was dropped
    freqs = info["class_frequencies"]["source/train"]
    assert freqs["terrain"] == freqs["truck"] == freqs["train"] == 0.0 and info["source_layout"] == "synthia"


def test_unknown_source_layout_lists_the_options():
    with pytest.raises(ValueError, match=r"source_layout: expected one of \['gta5', 'synthia'\], got 'coco'"):
        _config(source_layout="coco")
