"""Diagnosis on tiny data: the report, the rank correlation, the CLI end to end (and evaluate's CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from training.data.datasets import Sample
from training.evaluation.diagnose import diagnose, spearman
from training.evaluation.evaluate import evaluate
from training.evaluation.predictors import TorchPredictor
from training.networks import build_network


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The machine is shared: two spinning threads on two busy cores stall far more than one.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny benchmark in the real layouts, written by the data package's generator."""
    from training.data.synth.config import SceneConfig, SynthConfig
    from training.data.synth.writer import generate

    out = tmp_path_factory.mktemp("synth")
    config = SynthConfig(
        scene=SceneConfig(height=48, width=96),
        seed=3,
        source_count=3,
        target_count=3,
        val_count=3,
        source_val_count=2,
    )
    generate(config, out)
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(build_network("mobilenet_lraspp_tiny").state_dict(), path)
    return path


def test_spearman_matches_scipy_on_finite_entries() -> None:
    x = np.array([0.1, np.nan, 0.3, -0.2, 0.5, 0.0])
    y = np.array([1.0, 2.0, np.nan, -1.0, 3.0, 0.5])
    keep = np.isfinite(x) & np.isfinite(y)
    expected = spearmanr(x[keep], y[keep]).statistic
    got = spearman(x, y)
    assert got["rho"] == pytest.approx(expected) and got["classes_used"] == 4
    assert spearman(x[:2], y[:2])["rho"] is None


def biased_predictor(num_classes: int, favoured: int, gap: float):
    """Ground truth class gets logit 2; class `favoured` gets `gap` everywhere: over-predicted."""

    def predict(images: np.ndarray) -> np.ndarray:  # the label is stored in the red channel
        cls = images[..., 0].astype(np.int64)
        logits = 2.0 * np.eye(num_classes)[cls].transpose(0, 3, 1, 2)  # (N, C, H, W)
        rng = np.random.default_rng(int(images.sum()) % 1000)
        logits = logits + rng.normal(scale=0.5, size=logits.shape)
        logits[:, favoured] += gap
        return logits.astype(np.float32)

    return predict


def test_over_predicted_class_is_found_by_both_measures() -> None:
    c = 4
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        label = rng.integers(0, c, (16, 16)).astype(np.uint8)
        image = np.stack([label, label, label], -1)
        samples.append(Sample(image, label, str(i)))
    names = ["a", "b", "c", "d"]
    report = diagnose(biased_predictor(c, favoured=2, gap=1.5), samples, names, source_val=samples)
    target = report["target"]
    assert report["over_predicted"][0] == "c"
    assert int(np.argmax(report["label_free_bias"])) == 2
    assert target["bias"][2] > 0 and sum(target["bias"]) == pytest.approx(0.0, abs=1e-9)
    # Same data on both sides: no drop.
    assert report["miou_drop"] == pytest.approx(0.0)
    assert report["spearman"]["classes_used"] == 4
    # The target metrics are those of evaluate().
    ref = evaluate(biased_predictor(c, 2, 1.5), samples, names)["raw"]
    assert target["iou"] == pytest.approx(ref["iou"])
    json.dumps(report, allow_nan=False)


def test_diagnose_on_tiny_benchmark(tiny_data: Path) -> None:
    from training.datasets import load_split

    torch.manual_seed(0)
    predictor = TorchPredictor(build_network("mobilenet_lraspp_tiny"))
    names = [f"c{i}" for i in range(19)]
    report = diagnose(
        predictor,
        load_split(tiny_data, "target", "val"),
        names,
        source_val=load_split(tiny_data, "source", "val"),
        pixels_per_image=256,
        components=2,
    )
    assert report["target"]["num_images"] == 3 and report["source"]["num_images"] == 2
    assert len(report["label_free_bias"]) == 19
    rho = report["spearman"]["rho"]
    assert rho is None or -1.0 <= rho <= 1.0


def test_cli_diagnose_and_evaluate(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from blda.cli import app

    runner = CliRunner()
    out = tmp_path / "diag"
    common = ["--checkpoint", str(tiny_checkpoint), "--network", "mobilenet_lraspp_tiny", "--threads", "1"]
    result = runner.invoke(app, ["diagnose", "--data", str(tiny_data), *common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "diagnose.json").read_text())
    assert report["target"]["num_images"] == 3
    assert (out / "diagnose.png").stat().st_size > 1000
    assert "Spearman" in result.stdout

    out = tmp_path / "eval"
    args = ["evaluate", "--data", str(tiny_data), *common, "--out", str(out), "--tau", "0.2", "--tau", "0.5"]
    result = runner.invoke(app, [*args, "--source"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["target"]["calibrated"]) == {"0.2", "0.5"}
    assert metrics["source"]["num_images"] == 2
    assert (out / "metrics.png").stat().st_size > 1000

    missing = runner.invoke(app, ["diagnose", "--data", str(tmp_path / "nope"), *common])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "nope" in missing.stderr
    both = runner.invoke(app, ["evaluate", "--data", str(tiny_data), "--out", str(out)])
    assert both.exit_code == 2 and "exactly one" in both.stderr


@pytest.mark.parity
def test_export_with_offline_tables_then_evaluate_the_bundle(
    tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from blda.cli import app
    from calibration.bundle import load_bundle

    runner = CliRunner()
    args = [
        "export",
        "--checkpoint",
        str(tiny_checkpoint),
        "--network",
        "mobilenet_lraspp_tiny",
        "--threads",
        "1",
    ]
    args += ["--out", str(tmp_path / "models"), "--name", "t", "--version", "1", "--data", str(tiny_data)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert "refitted" in summary["calibration_tables"]
    # Three target images leave no tuning split: nothing justifies calibration, so it ships off.
    assert summary["calibration_choice"]["enabled"] is False
    bundle = load_bundle(tmp_path / "models" / "t" / "1")
    assert bundle.tables is not None and bundle.manifest.calibration is not None

    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--data",
            str(tiny_data),
            "--bundle",
            str(bundle.directory),
            "--out",
            str(out),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    from_bundle = json.loads((out / "metrics.json").read_text())
    assert from_bundle["calibration_tables"] == {"source": "bundle"}
    assert 0 <= from_bundle["target"]["pit"]["mean_abs_deviation"] <= 0.5
    # onnxruntime on the bundle and torch on the checkpoint give the same raw confusion matrix.
    out_t = tmp_path / "eval_torch"
    ckpt = ["--checkpoint", str(tiny_checkpoint), "--network", "mobilenet_lraspp_tiny", "--threads", "1"]
    result = runner.invoke(app, ["evaluate", "--data", str(tiny_data), *ckpt, "--out", str(out_t)])
    assert result.exit_code == 0, result.output
    from_torch = json.loads((out_t / "metrics.json").read_text())
    assert from_bundle["target"]["confusion_raw"] == from_torch["target"]["confusion_raw"]


@pytest.mark.parity
def test_export_writes_the_refitted_tables_and_evaluate_applies_them(
    tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The bundle's tables are the refit of the model's eval-mode logits (not the training-time GMMs), and
    `blda evaluate` with a τ scores exactly the calibrated rule on those tables, which differs from raw."""
    from blda.cli import app
    from calibration.alignment import calibrated_decision
    from calibration.bias import confusion_matrix
    from calibration.bundle import load_bundle
    from calibration.refit import RefitConfig
    from calibration.segmentation import decision_size, resize_nearest, upsample_bilinear
    from training.datasets import load_split
    from training.evaluation.predictors import OnnxPredictor, ResizingPredictor
    from training.export import predictor_for
    from training.models import load_model
    from training.tables import fit_serving_tables

    runner = CliRunner()
    models = tmp_path / "models"
    args = [
        "export",
        "--checkpoint",
        str(tiny_checkpoint),
        "--network",
        "mobilenet_lraspp_tiny",
        "--threads",
        "1",
    ]
    args += ["--out", str(models), "--name", "t", "--version", "1", "--data", str(tiny_data), "--seed", "4"]
    assert runner.invoke(app, args).exit_code == 0
    bundle = load_bundle(models / "t" / "1")
    assert bundle.tables is not None
    loaded = load_model(tiny_checkpoint, "mobilenet_lraspp_tiny")
    expected, _ = fit_serving_tables(
        predictor_for(loaded),
        load_split(tiny_data, "source", "train", 200),
        load_split(tiny_data, "target", "train", 200),
        RefitConfig(seed=4),
    )
    for name, value in expected.to_arrays().items():
        np.testing.assert_allclose(bundle.tables.to_arrays()[name], value, rtol=1e-6, atol=1e-6, err_msg=name)

    tau = 3.0
    out = tmp_path / "eval"
    cmd = ["evaluate", "--data", str(tiny_data), "--bundle", str(bundle.directory), "--out", str(out)]
    assert runner.invoke(app, [*cmd, "--tau", str(tau), "--threads", "1"]).exit_code == 0
    metrics = json.loads((out / "metrics.json").read_text())["target"]
    spec = bundle.manifest.input
    assert spec.size is not None
    predictor = ResizingPredictor(
        OnnxPredictor(bundle.model_path, spec.mean, spec.std, spec.pixel_scale, 1), size=spec.size
    )
    conf = np.zeros((19, 19), np.int64)
    for sample in load_split(tiny_data, "target", "val"):
        # The service's decision (calibration.segmentation): numpy's upsample, not torch's, whose float
        # rounding differs by ~1e-7 and can flip a near-tie at this large tau.
        size = decision_size(sample.label.shape, spec.size, 2.0)
        up = upsample_bilinear(predictor(sample.image[None])[0], size)
        chosen = resize_nearest(calibrated_decision(up, bundle.tables.shifts, tau), *sample.label.shape)
        conf += confusion_matrix(chosen, sample.label, 19)
    np.testing.assert_array_equal(np.array(metrics["confusion_calibrated"][f"{tau:g}"]), conf)
    assert not np.array_equal(conf, np.array(metrics["confusion_raw"]))


def test_a_refit_written_by_evaluate_serves_a_later_evaluation(
    tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from blda.cli import app

    runner = CliRunner()
    ckpt = ["--checkpoint", str(tiny_checkpoint), "--network", "mobilenet_lraspp_tiny", "--threads", "1"]
    first, second = tmp_path / "refit", tmp_path / "reuse"
    common = ["evaluate", "--data", str(tiny_data), *ckpt, "--tau", "1.5"]
    assert runner.invoke(app, [*common, "--out", str(first)]).exit_code == 0
    assert (first / "tables.npz").is_file()
    result = runner.invoke(app, [*common, "--out", str(second), "--tables", str(first / "tables.npz")])
    assert result.exit_code == 0, result.output
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert b["calibration_tables"]["source"] == "file" and not (second / "tables.npz").exists()
    assert a["target"]["confusion_calibrated"] == b["target"]["confusion_calibrated"]
    assert a["target"]["pit"] == b["target"]["pit"]
