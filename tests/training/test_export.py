"""Export to a bundle: ONNX checks, torch/onnxruntime parity with dynamic axes, manifest, checkpoints, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calibration.bundle import load_bundle
from calibration.classes import CLASS_NAMES, PALETTE
from calibration.distributions import fit_pair_gmms
from calibration.tables import build_calibration_tables
from training.evaluation.predictors import OnnxPredictor, TorchPredictor
from training.export import ExportSpec, check_onnx, export_bundle, parity_errors, to_onnx
from training.models import ExportError, load_model
from training.networks import IMAGE_MEAN, IMAGE_STD, build_network

NETWORK = "mobilenet_lraspp_tiny"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The machine is shared: two spinning threads on two busy cores stall far more than one.
    torch.set_num_threads(1)


def tiny_model(name: str = NETWORK) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_network(name)
    # Random BatchNorm statistics, so the exported graph is not trivially the identity there.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def random_tables(c: int = 19, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, (1, 24, 24))
    logits = rng.normal(size=(1, c, 24, 24)) + 4.0 * np.eye(c)[labels].transpose(0, 3, 1, 2)
    pairs, counts = fit_pair_gmms(logits, labels, c, k=2, iters=20)
    return build_calibration_tables(pairs, counts, num_knots=32)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["mobilenet_lraspp_tiny", "segformer_tiny"])
def test_torch_onnxruntime_parity_at_two_sizes_batch_two(name: str) -> None:
    model = tiny_model(name)
    data = to_onnx(model)
    check_onnx(data)
    errors = parity_errors(model, data, sizes=((64, 96), (72, 136)), batch=2)
    assert set(errors) == {"2x64x96", "2x72x136"}
    assert max(errors.values()) < 1e-4


@pytest.mark.parity
def test_dynamic_axes_in_graph_and_at_run_time() -> None:
    import onnx
    import onnxruntime as ort

    model = tiny_model()
    data = to_onnx(model)
    graph = onnx.load_from_string(data).graph
    (image,) = graph.input
    (logits,) = graph.output
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3]))
    out_dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
    assert out_dims[1] == 19 and isinstance(out_dims[0], str)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for n, h, w in [(1, 32, 32), (3, 40, 104)]:
        (out,) = session.run(["logits"], {"image": np.zeros((n, 3, h, w), np.float32)})
        assert out.shape == (n, 19, -(-h // 4), -(-w // 4))


@pytest.mark.parity
def test_bundle_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    tables = random_tables()
    spec = ExportSpec(
        name="tiny",
        version="0.0.1",
        network=NETWORK,
        trained=True,
        input_size=(64, 128),
        tau=0.3,
        config={"seed": 0},
        data={"root": "nowhere"},
        metrics={"miou": 0.5},
    )
    directory, errors = export_bundle(model, spec, tmp_path, tables)
    assert directory == tmp_path / "tiny" / "0.0.1"
    bundle = load_bundle(directory)
    m = bundle.manifest
    assert m.class_names == list(CLASS_NAMES)
    np.testing.assert_array_equal(m.palette(), PALETTE)
    assert m.input.mean == pytest.approx(IMAGE_MEAN) and m.input.std == pytest.approx(IMAGE_STD)
    assert m.input.size == (64, 128)
    assert m.output.num_classes == 19 and m.output.stride == 4
    assert m.calibration is not None and m.calibration.tau_default == 0.3
    assert m.provenance.trained and m.provenance.network == NETWORK
    assert m.provenance.metrics["miou"] == 0.5
    assert m.provenance.metrics["onnx_parity_max_abs"] == errors
    assert bundle.tables is not None
    np.testing.assert_array_equal(bundle.tables.shifts.delta, tables.shifts.delta)
    # The bundle alone (onnxruntime + manifest normalisation) reproduces the torch model on uint8 images.
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)
    onnx_pred = OnnxPredictor(bundle.model_path, m.input.mean, m.input.std, m.input.pixel_scale)
    np.testing.assert_allclose(onnx_pred(images), TorchPredictor(model)(images), atol=1e-4)


@pytest.mark.parity
def test_parity_failure_fails_the_export(tmp_path: Path) -> None:
    spec = ExportSpec(name="tiny", version="1", network=NETWORK, trained=False)
    with pytest.raises(ExportError, match="parity"):
        export_bundle(tiny_model(), spec, tmp_path, None, tolerance=-1.0)
    assert not (tmp_path / "tiny" / "1").exists()


def test_checker_rejects_garbage() -> None:
    with pytest.raises(ExportError, match=r"model.onnx: expected a valid ONNX model"):
        check_onnx(b"not a model")


def test_training_checkpoint_with_gmm_state_gives_tables(tmp_path: Path) -> None:
    from training.checkpoint import Checkpoint, save_checkpoint
    from training.config import ModelConfig, TrainConfig
    from training.uda.gmm import GmmState

    tables = random_tables()

    def state(gmm, counts) -> GmmState:
        return GmmState(
            weights=torch.from_numpy(gmm.weights),
            means=torch.from_numpy(gmm.means),
            stds=torch.from_numpy(gmm.stds),
            counts=torch.from_numpy(counts.astype(np.float64)),
            updates=torch.ones(counts.shape, dtype=torch.int64),
            last_seen=torch.zeros(counts.shape, dtype=torch.int64),
        )

    model = tiny_model()
    config = dataclasses.replace(TrainConfig(), model=ModelConfig(network=NETWORK))
    ckpt = Checkpoint(
        config=config,
        iteration=7,
        model=model.state_dict(),
        gmm_source=state(tables.source, tables.source_counts),
        gmm_target=state(tables.target, tables.target_counts),
        metrics={"miou": 0.25},
    )
    path = save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    loaded = load_model(path)
    assert loaded.network == NETWORK and loaded.iteration == 7 and loaded.metrics == {"miou": 0.25}
    assert loaded.tables is not None
    np.testing.assert_allclose(loaded.tables.target.means, tables.target.means)
    np.testing.assert_array_equal(loaded.tables.source_counts, tables.source_counts)
    assert np.abs(loaded.tables.shifts.delta).max() > 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, model(x).logits)
    with pytest.raises(ExportError, match="teacher"):
        load_model(path, teacher=True)


def test_plain_state_dict_needs_a_network_name(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(ExportError, match="--network"):
        load_model(path)
    assert load_model(path, NETWORK).network == NETWORK
    with pytest.raises(ExportError, match="expected weights matching"):
        load_model(path, "segformer_tiny")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.parity
def test_cli_untrained_export_and_errors(tmp_path: Path) -> None:
    from blda.cli import app

    runner = CliRunner()
    args = [
        "export",
        "--untrained",
        "--network",
        NETWORK,
        "--out",
        str(tmp_path),
        "--name",
        "x",
        "--version",
        "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["trained"] is False
    bundle = load_bundle(tmp_path / "x" / "0")
    assert not bundle.manifest.provenance.trained and "UNTRAINED" in bundle.manifest.description
    # Without --version: the next version after the highest present, so the export is the one served.
    again = runner.invoke(app, args[:-2])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "x" / "1" / "manifest.json").is_file()
    assert "the service serves x/1 (the highest version" in again.stderr
    bad = runner.invoke(app, ["export", "--out", str(tmp_path)])
    assert bad.exit_code == 2
    assert "expected --checkpoint" in bad.stderr and "Traceback" not in bad.output
    bad = runner.invoke(app, ["export", "--untrained", "--network", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "mobilenet_lraspp" in bad.stderr


def test_root_cli_lists_the_commands() -> None:
    from blda.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("evaluate", "export", "diagnose"):
        assert command in result.stdout


def test_a_checkpoint_where_a_bundle_is_expected_and_the_reverse_is_one_line(tmp_path: Path) -> None:
    from blda.cli import app
    from calibration.bundle import served_version

    models = Path(__file__).resolve().parents[2] / "models"
    shipped = models / "blda-synth" / str(served_version(models, "blda-synth"))
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": {}}, checkpoint)
    data = tmp_path / "data"
    cases = [
        (["export", "--checkpoint", str(shipped / "model.onnx"), "--out", str(tmp_path)], "expected a torch checkpoint, got an ONNX model (pass its bundle directory as --bundle)"),
        (["export", "--checkpoint", str(shipped), "--out", str(tmp_path)], "expected a torch checkpoint file, got a bundle directory"),
        (["evaluate", "--bundle", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "e")], "expected a bundle directory (NAME/VERSION/ with manifest.json), got a file (a torch checkpoint"),
        (["evaluate", "--bundle", str(shipped / "model.onnx"), "--data", str(data), "--out", str(tmp_path / "e")], "got a file (an ONNX model: bundle it with `blda bundle create --onnx`)"),
    ]  # fmt: skip
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
