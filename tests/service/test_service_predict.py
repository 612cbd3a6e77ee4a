"""`blda predict`: the served masks, byte for byte, for a folder; errors by name; no silent overwrite."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import encode, png_bytes, scene
from typer.testing import CliRunner

from blda.cli import app

PNG = {"content-type": "image/png"}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder: PNGs (one in a subfolder), a JPEG, a corrupt PNG and a text file (not an image)."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes(scene(50, 70, seed=1)))
    (root / "sub" / "b.png").write_bytes(png_bytes(scene(33, 41, seed=2)))
    (root / "c.jpg").write_bytes(encode(Image.fromarray(scene(40, 64, seed=3)), "JPEG", quality=90))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def predict(models_dir: Path, *args: str) -> tuple[int, str]:
    """`blda predict` with the model the test app serves by default (tiny, its active version 2)."""
    model = [] if "--model" in args else ["--model", "tiny"]
    result = CliRunner().invoke(
        app,
        ["predict", "--models-dir", str(models_dir), "--jobs", "2", *model, *args],
        catch_exceptions=False,
    )
    return result.exit_code, result.output


@pytest.mark.parametrize("calibrate", [True, False])
def test_predicted_masks_are_the_served_masks_byte_for_byte(
    client: TestClient, models_dir: Path, images: Path, tmp_path: Path, calibrate: bool
) -> None:
    out = tmp_path / "out"
    flag = "--calibrate" if calibrate else "--no-calibrate"
    code, output = predict(models_dir, str(images), "--out", str(out), flag, "--tau", "0.5")
    assert code == 1  # the corrupt file
    assert f"error: {images / 'broken.png'}: expected a PNG, JPEG or WebP image" in output
    assert "notes.txt" not in output  # folders are searched for images only
    for name, written in [("a.png", "a.png"), ("sub/b.png", "sub/b.png"), ("c.jpg", "c.png")]:
        served = client.post(
            f"/v1/models/tiny/segment?calibrate={str(calibrate).lower()}&tau=0.5",
            content=(images / name).read_bytes(),
            headers=PNG,
        )
        assert served.status_code == 200
        assert (out / written).read_bytes() == served.content, name
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a.png",
        "c.png",
        "sub/b.png",
    ]


def test_json_output_is_the_apis(client: TestClient, models_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    predict(models_dir, str(images / "a.png"), "--out", str(out), "--format", "json", "--calibrate")
    mine = json.loads((out / "a.json").read_text())
    served = client.post(
        "/v1/segment?calibrate=true&format=json", content=(images / "a.png").read_bytes(), headers=PNG
    ).json()
    assert mine.pop("file") == str(images / "a.png")
    served.pop("request_id")
    assert mine == served


def test_existing_outputs_are_kept_unless_overwrite(models_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out).mkdir()
    (out / "a.png").write_bytes(b"mine")
    code, output = predict(models_dir, str(images / "a.png"), "--out", str(out))
    assert code == 0 and "skipped" in output and (out / "a.png").read_bytes() == b"mine"
    code, _ = predict(models_dir, str(images / "a.png"), "--out", str(out), "--overwrite")
    assert code == 0 and (out / "a.png").read_bytes().startswith(b"\x89PNG")


def test_overlay_and_unreadable_inputs(models_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.png"
    code, output = predict(
        models_dir,
        str(images / "a.png"),
        str(images / "notes.txt"),
        str(missing),
        "--out",
        str(out),
        "--overlay",
    )
    assert code == 1
    assert f"error: {missing}: expected an image file or a folder" in output
    assert f"error: {images / 'notes.txt'}: expected a PNG, JPEG or WebP image" in output  # named: tried
    overlay = np.asarray(Image.open(io.BytesIO((out / "a.overlay.png").read_bytes())))
    assert overlay.shape == (50, 70, 3)
    assert "1 written" in output


def test_two_inputs_for_one_output_is_an_error(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x.png").write_bytes(png_bytes(scene(20, 20)))
    (folder / "x.webp").write_bytes(encode(Image.fromarray(scene(20, 20)), "WEBP"))
    code, output = predict(models_dir, str(folder), "--out", str(tmp_path / "out"))
    assert code == 1 and f"error: {folder / 'x.webp'}: expected one input per output" in output


def test_unknown_model_or_version_is_one_line(models_dir: Path, tmp_path: Path) -> None:
    code, output = predict(models_dir, str(tmp_path), "--out", str(tmp_path / "o"), "--model", "tiny:9")
    assert code == 2 and "expected one of the versions ['1', '2'], got '9'" in output
    code, output = predict(models_dir, str(tmp_path), "--out", str(tmp_path / "o"), "--model", "nope")
    assert code == 2 and "nope" in output
