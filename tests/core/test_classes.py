import numpy as np
import pytest

from calibration import classes as K


def test_nineteen_classes_with_official_ids_and_palette():
    assert len(K.CLASSES) == 19
    assert [c.train_id for c in K.CLASSES] == list(range(19))
    assert K.CLASS_NAMES[:3] == ("road", "sidewalk", "building")
    assert K.CLASS_NAMES[-2:] == ("motorcycle", "bicycle")
    assert [c.label_id for c in K.CLASSES] == [
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        31,
        32,
        33,
    ]
    assert K.PALETTE.shape == (19, 3) and K.PALETTE.dtype == np.uint8
    assert tuple(K.PALETTE[K.TRAIN_ID["car"]]) == (0, 0, 142)
    assert tuple(K.PALETTE[K.TRAIN_ID["rider"]]) == (255, 0, 0)


def test_label_to_train_lut_maps_the_19_ids_and_ignores_the_rest():
    lut = K.LABEL_TO_TRAIN
    assert lut.shape == (256,) and lut.dtype == np.uint8
    evaluated = {c.label_id for c in K.CLASSES}
    for label_id in range(256):
        expected = next((c.train_id for c in K.CLASSES if c.label_id == label_id), 255)
        assert lut[label_id] == expected
    assert all(lut[i] == K.IGNORE_INDEX for i in range(34) if i not in evaluated)  # e.g. 0 unlabeled, 1 ego
    assert np.array_equal(K.LABEL_TO_TRAIN[K.TRAIN_TO_LABEL[:19]], np.arange(19))


def test_synthia_mapping_and_subsets():
    assert K.SYNTHIA_TO_TRAIN[3] == K.TRAIN_ID["road"]
    assert K.SYNTHIA_TO_TRAIN[10] == K.TRAIN_ID["person"]
    assert K.SYNTHIA_TO_TRAIN[17] == K.TRAIN_ID["rider"]
    assert sorted(K.SYNTHIA_TO_TRAIN.values()) == list(range(19))
    assert len(K.SYNTHIA_16_TRAIN_IDS) == 16 and len(K.SYNTHIA_13_TRAIN_IDS) == 13
    # the 16-class protocol drops terrain, truck, train; the 13-class one also wall, fence, pole
    assert set(range(19)) - set(K.SYNTHIA_16_TRAIN_IDS) == {9, 14, 16}
    assert set(K.SYNTHIA_16_TRAIN_IDS) - set(K.SYNTHIA_13_TRAIN_IDS) == {3, 4, 5}
    lut16 = K.synthia_lut(16)
    assert lut16.shape == (65536,)
    assert lut16[3] == 0 and lut16[10] == K.SYNTHIA_16_TRAIN_IDS.index(11)
    assert lut16[16] == 255  # terrain is not in the 16-class subset
    assert K.synthia_lut(19)[0] == 255 and K.synthia_lut(19)[22] == 255  # void, lane marking
    assert K.subset_names(13)[3] == "traffic light"


def test_unknown_subset_lists_the_options():
    with pytest.raises(ValueError, match=r"expected one of \[13, 16, 19\], got 12"):
        K.subset_lut(12)


def test_colorize():
    ids = np.array([[0, 18], [255, 10]], dtype=np.uint8)
    rgb = K.colorize(ids)
    assert rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[1, 0]) == (0, 0, 0)
