"""`blda synth` and `blda contact-sheet`: they write what they say, and bad input is one line + exit 2."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from training.data.cli import app

runner = CliRunner()


def test_synth_then_contact_sheet(tmp_path):
    out = tmp_path / "bench"
    args = ["synth", "--out", str(out), "--count", "2", "--target-count", "1", "--val-count", "2"]
    args += ["--source-val-count", "1", "--height", "32", "--width", "64", "--workers", "1", "--seed", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "synth.json").is_file()
    assert len(list((out / "source" / "images").glob("*.png"))) == 2
    assert len(list((out / "target" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))) == 2
    with Image.open(out / "source" / "images" / "00001.png") as im:
        assert im.size == (64, 32)
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["contact-sheet", "--data", str(out), "--out", str(sheet), "--count", "2"])
    assert result.exit_code == 0, result.output
    with Image.open(sheet) as im:
        assert np.asarray(im).std() > 0


def test_bad_shift_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--shift-strength", "7"])
    assert result.exit_code == 2
    assert "ShiftConfig.strength: expected a value in [0, 3], got 7.0" in result.output
    assert "Traceback" not in result.output


def test_bad_size_and_workers(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--height", "4"])
    assert result.exit_code == 2 and "expected height and width >= 16" in result.output
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--workers", "0"])
    assert result.exit_code == 2 and "--workers: expected >= 1, got 0" in result.output


def test_contact_sheet_on_a_missing_folder(tmp_path):
    result = runner.invoke(app, ["contact-sheet", "--data", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "expected the GTA5 root folder" in result.output and "Traceback" not in result.output
