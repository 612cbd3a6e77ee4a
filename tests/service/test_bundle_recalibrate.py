"""`blda bundle recalibrate`: the live refit offline, from image files or from the service's traffic sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from service_helpers import BundleFactory, png_bytes, scene
from typer.testing import CliRunner

from calibration.bundle import load_bundle
from calibration.traffic import save_sample
from service.bundle_cli import app
from service.inference import load_served_model
from service.recalibration.offline import sample_images

runner = CliRunner()


def test_images_and_their_traffic_sample_give_the_same_new_version(
    tmp_path: Path, make_bundle: BundleFactory
) -> None:
    models = tmp_path / "models"
    base = make_bundle(models, "tiny", "1", seed=0)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(4):
        (images / f"{seed}.png").write_bytes(png_bytes(scene(48, 64, seed)))
    common = ["--bundle", str(base), "--pixels-per-image", "1500", "--min-row-pixels", "100"]

    result = runner.invoke(app, ["recalibrate", *common, "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "PIT deviation" in result.output
    from_images = load_bundle(models / "tiny" / "2")  # the next version, beside the base
    recalibration = from_images.manifest.provenance.data["recalibration"]
    assert recalibration["base_version"] == "1" and recalibration["pixels"] == 4 * 1500

    model = load_served_model(base, threads=1, provider="cpu")
    paths = sorted(images.glob("*.png"))  # the order the CLI collects them in
    traffic = save_sample(tmp_path / "traffic.npz", sample_images(model, paths, 1500, seed=0))
    result = runner.invoke(
        app, ["recalibrate", *common, "--traffic", str(traffic), "--version", "from-traffic"]
    )
    assert result.exit_code == 0, result.output
    from_traffic = load_bundle(models / "tiny" / "from-traffic")
    assert from_images.tables is not None and from_traffic.tables is not None
    np.testing.assert_array_equal(from_images.tables.target.means, from_traffic.tables.target.means)
    base_tables = load_bundle(base).tables
    assert base_tables is not None
    np.testing.assert_array_equal(from_images.tables.source.means, base_tables.source.means)
    assert not np.array_equal(from_images.tables.target.means, base_tables.target.means)


def test_recalibrate_names_what_is_missing(tmp_path: Path, make_bundle: BundleFactory) -> None:
    base = make_bundle(tmp_path / "models", "tiny", "1", seed=0)
    neither = runner.invoke(app, ["recalibrate", "--bundle", str(base)])
    assert (
        neither.exit_code == 2 and "expected --traffic FILE or --images PATH, got neither" in neither.output
    )
    (tmp_path / "junk.npz").write_bytes(b"junk")
    junk = runner.invoke(app, ["recalibrate", "--bundle", str(base), "--traffic", str(tmp_path / "junk.npz")])
    assert junk.exit_code == 2 and "expected an npz" in junk.output
    plain = make_bundle(tmp_path / "models", "plain", "1", seed=2, calibrated=False)
    no_tables = runner.invoke(
        app, ["recalibrate", "--bundle", str(plain), "--traffic", str(tmp_path / "junk.npz")]
    )
    assert no_tables.exit_code == 2 and "calibration tables" in no_tables.output
