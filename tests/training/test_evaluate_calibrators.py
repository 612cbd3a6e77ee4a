"""`blda evaluate --calibrators` and the exporter's calibrators on a tiny benchmark with a tuning split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from calibration.calibrators.calibrator import CALIBRATOR_NAMES
from training.networks import build_network


@pytest.fixture(scope="module")
def tuned_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synth.config import SceneConfig, SynthConfig
    from training.data.synth.writer import generate

    out = tmp_path_factory.mktemp("synth")
    # 20 target images: a tuning split of 2 (data.tuning_fraction 0.1).
    config = SynthConfig(
        scene=SceneConfig(height=48, width=96),
        seed=5,
        source_count=3,
        target_count=20,
        val_count=2,
        source_val_count=2,
    )
    generate(config, out)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(build_network("mobilenet_lraspp_tiny").state_dict(), path)
    return path


def best_on_tuning(rows: list[dict]) -> str:
    """The calibrator of highest tuning mIoU, "none" unless another is strictly better."""
    none = next(r for r in rows if r["calibrator"] == "none")
    best = max(rows, key=lambda r: r["miou"])
    return best["calibrator"] if best["miou"] > none["miou"] else "none"


@pytest.mark.slow  # ~30 s on 2 busy cores: two model passes over a tiny benchmark, every calibrator fitted
def test_evaluate_prints_one_table_and_export_ships_every_calibrator(
    tuned_data: Path, weights: Path, tmp_path: Path
) -> None:
    from blda.cli import app
    from calibration.bundle import load_bundle

    runner = CliRunner()
    model = ["--checkpoint", str(weights), "--network", "mobilenet_lraspp_tiny", "--threads", "1"]
    out = tmp_path / "eval"
    args = ["evaluate", "--data", str(tuned_data), *model, "--out", str(out), "--tau", "0"]
    result = runner.invoke(app, [*args, "--tables", "refit", "--calibrators", "all"])
    assert result.exit_code == 0, result.output
    assert "| calibrator | mIoU |" in result.stdout and "| blda+em-prior |" in result.stdout
    compared = json.loads((out / "metrics.json").read_text())["calibrators"]
    assert [r["calibrator"] for r in compared["val"]] == list(CALIBRATOR_NAMES)
    assert compared["images"] == {"tuning": 2, "val": 2}
    assert compared["default"] == best_on_tuning(compared["tuning"])
    assert all(r["cost_ms"] > 0 for r in compared["val"])

    unknown = runner.invoke(app, [*args, "--calibrators", "platt"])
    assert unknown.exit_code != 0 and "expected names among" in unknown.output

    models = tmp_path / "models"
    export = [
        "export",
        *model,
        "--out",
        str(models),
        "--name",
        "t",
        "--version",
        "1",
        "--data",
        str(tuned_data),
    ]
    result = runner.invoke(app, export)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(models / "t" / "1")
    spec = bundle.manifest.calibration
    assert spec is not None
    assert list(bundle.calibrators) == list(CALIBRATOR_NAMES)
    assert [r["calibrator"] for r in spec.tuning_table] == list(CALIBRATOR_NAMES)
    assert bundle.default_calibrator == best_on_tuning(spec.tuning_table)
    assert spec.enabled_default == (bundle.default_calibrator != "none")
    assert bundle.calibrators["blda"].tau == spec.tau_default
