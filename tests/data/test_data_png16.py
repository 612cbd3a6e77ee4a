import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training.data.png16 import PngError, read_png16, write_png16


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    channels=st.sampled_from([1, 2, 3, 4]),
    filter_type=st.integers(0, 4),
    seed=st.integers(0, 2**31),
)
def test_round_trip_every_filter(tmp_path_factory, h, w, channels, filter_type, seed):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    a = rng.integers(0, 65536, shape, dtype=np.uint16)
    path = tmp_path_factory.mktemp("png") / "x.png"
    write_png16(path, a, filter_type)
    assert np.array_equal(read_png16(path), a)


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
def test_grey_matches_pillow(tmp_path, filter_type):
    # Pillow decodes 16-bit grey exactly: an independent reference for the decoder
    a = np.random.default_rng(filter_type).integers(0, 65536, (13, 17), dtype=np.uint16)
    write_png16(tmp_path / "g.png", a, filter_type)
    with Image.open(tmp_path / "g.png") as im:
        ref = np.asarray(im).astype(np.uint16)
    assert np.array_equal(ref, a)
    assert np.array_equal(read_png16(tmp_path / "g.png"), ref)


def test_rejects_8_bit_and_garbage(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb8.png")
    with pytest.raises(PngError, match="expected a 16-bit PNG, got bit depth 8"):
        read_png16(tmp_path / "rgb8.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all, really not" * 3)
    with pytest.raises(PngError, match="expected a PNG file"):
        read_png16(tmp_path / "junk.png")
