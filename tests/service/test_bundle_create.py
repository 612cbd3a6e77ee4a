"""`blda bundle create|validate|inspect` with models the project did not build: an ONNX graph written here
(its own input/output names, logits at input resolution, 7 classes) and the shipped model's ONNX (logits at
1/4), each bundled from generated image folders, validated, served, segmented raw and calibrated, and
given feedback. torch is blocked in the processes that create bundles: the path must not need it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from service_helpers import settings_for
from typer.testing import CliRunner

from blda.cli import app
from calibration.bundle import served_version
from service.app import create_app

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "blda-synth" / str(served_version(ROOT / "models", "blda-synth")) / "model.onnx"
C7 = 7
runner = CliRunner()


def foreign_model(head: str | None = None, num_classes: int = C7) -> bytes:
    """pixels (N, 3, H, W) -> 3x3 conv -> scores (N, C, H, W): logits at input resolution; `head`
    "Softmax" or "LogSoftmax" appends that op (a model exported with its normalisation)."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0.0, 0.6, (num_classes, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0.0, 0.3, num_classes).astype(np.float32)
    conv_out = "conv" if head else "scores"
    nodes = [
        helper.make_node("Conv", ["pixels", "w", "b"], [conv_out], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    ]
    if head:
        nodes.append(helper.make_node(head, [conv_out], ["scores"], axis=1))
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [
            helper.make_tensor_value_info(
                "scores", TensorProto.FLOAT, ["batch", num_classes, "height", "width"]
            )
        ],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_folders(
    root: Path,
    num_classes: int,
    size: tuple[int, int],
    counts: tuple[int, int],
    label_ids: np.ndarray | None = None,
) -> dict[str, Path]:
    """Source images + labels and target images + labels: blocks of class colours, noise, some ignore."""
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, (num_classes, 3))
    paths = {k: root / k for k in ("src_img", "src_lab", "tgt_img", "tgt_lab")}
    for p in paths.values():
        p.mkdir(parents=True)
    h, w = size
    for domain, n, shift in (("src", counts[0], 0), ("tgt", counts[1], 25)):
        for i in range(n):
            label = rng.integers(0, num_classes, (h // 8, w // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
            image = np.clip(colors[label] + shift + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            stored = label.copy() if label_ids is None else label_ids[label].astype(np.uint8)
            stored[:2] = 255 if label_ids is None else 0  # ignore rows (Cityscapes id 0 is "unlabeled")
            Image.fromarray(image).save(paths[f"{domain}_img"] / f"{domain}{i:02d}.png")
            Image.fromarray(stored, "L").save(paths[f"{domain}_lab"] / f"{domain}{i:02d}.png")
    return paths


def create_args(
    onnx_path: Path, name: str, models: Path, folders: dict[str, Path] | None, *extra: str
) -> list[str]:
    args = ["bundle", "create", "--onnx", str(onnx_path), "--name", name, "--out", str(models)]
    if folders is not None:
        args += [
            "--source-images", str(folders["src_img"]), "--source-labels", str(folders["src_lab"]),
            "--target-images", str(folders["tgt_img"]), "--target-labels", str(folders["tgt_lab"]),
        ]  # fmt: skip
    return [*args, "--pixels-per-image", "512", "--threads", "1", *extra]


def run_blda_without_torch(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`blda ARGS` in a fresh process where importing torch fails (as in a serving install)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from blda.cli import app\n"
        f"app({args!r}, prog_name='blda')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def serve_segment_feedback(
    models: Path, name: str, image: np.ndarray, truth: np.ndarray
) -> dict[str, object]:
    """Serve the models directory; segment raw and calibrated; post feedback on the calibrated one."""
    settings = settings_for(models, default_model=name)
    with TestClient(create_app(settings)) as client:
        listing = {m["name"]: m for m in client.get("/v1/models").json()}
        assert listing[name]["versions"][0]["status"] == "ready", listing
        masks = {}
        for calibrate in ("false", "true"):
            response = client.post(
                f"/v1/models/{name}/segment",
                params={"calibrate": calibrate},
                content=png(image),
                headers={"content-type": "image/png"},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-calibrated"] == calibrate, dict(response.headers)
            masks[calibrate] = np.asarray(Image.open(io.BytesIO(response.content)))
            assert masks[calibrate].shape == image.shape[:2]
            request_id = response.headers["x-request-id"]
        files = {"mask": ("truth.png", png(truth), "image/png")}
        feedback = client.post("/v1/feedback", data={"request_id": request_id}, files=files)
        assert feedback.status_code == 200, feedback.text
        assert feedback.json()["calibrated"] is True
        bias = client.get(f"/v1/models/{name}/bias")
        assert bias.status_code == 200, bias.text
    return {"masks": masks, "feedback": feedback.json()}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    onnx_path = root / "segmenter.onnx"
    onnx_path.write_bytes(foreign_model())
    classes = root / "classes.json"
    classes.write_text(
        json.dumps(["sky", "tree", "road", "car", {"name": "person", "color": [220, 20, 60]}, "wall", "dog"])
    )
    return {"onnx": onnx_path, "classes": classes, "root": root, **write_folders(root, C7, (48, 64), (4, 6))}


def test_a_foreign_model_becomes_a_calibrated_served_bundle(foreign: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = run_blda_without_torch(
        create_args(foreign["onnx"], "foreign", models, foreign, "--classes", str(foreign["classes"]))
    )
    assert result.returncode == 0, result.stderr
    assert "the service serves foreign/1.0.0" in result.stdout  # no --version: the next one, 1.0.0
    bundle = models / "foreign" / "1.0.0"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["name"] == "pixels" and manifest["output"]["name"] == "scores"
    assert manifest["output"] == {"name": "scores", "num_classes": C7, "stride": 1}
    assert [c["name"] for c in manifest["classes"]][:5] == ["sky", "tree", "road", "car", "person"]
    assert manifest["classes"][4]["color"] == [220, 20, 60]
    data = manifest["provenance"]["data"]
    # Every 5th of the 6 target images (2) is held out to choose the default; 4 are fitted.
    assert (data["source_images_fitted"], data["target_images_fitted"], data["target_images_held_out"]) == (
        4,
        4,
        2,
    )
    assert data["source_images"] == str(foreign["src_img"]) and data["label_format"] == "train-ids"
    choice = manifest["provenance"]["metrics"]["calibration_choice"]
    assert choice["images"] == 2 and set(choice["calibrated_miou"]) == {"0.1", "0.2", "0.4"}
    assert manifest["calibration"]["enabled_default"] == choice["enabled"]
    # Every calibrator is fitted and measured on the held-out images; the default is the best there.
    calibration = manifest["calibration"]
    assert calibration["calibrators"] == [
        "none",
        "logit-adjust",
        "em-prior",
        "bcts",
        "bcts-em",
        "blda",
        "blda+em-prior",
    ]
    rows = {r["calibrator"]: r["miou"] for r in calibration["tuning_table"]}
    best = max(rows, key=lambda n: rows[n])
    assert calibration["default_calibrator"] == (best if rows[best] > rows["none"] else "none")
    assert "calibrators.json" in manifest["files"]
    assert len(choice["pit"]["mean_u"]) == C7 and sum(choice["pit"]["pixels"]) > 0
    assert manifest["provenance"]["config"]["graph"]["dynamic_axes"] == {
        "input": [0, 2, 3],
        "output": [0, 2, 3],
    }

    validated = runner.invoke(app, ["bundle", "validate", str(bundle)])
    assert validated.exit_code == 0, validated.output
    assert "ok: foreign/1.0.0" in validated.output and "7 channels = 7 classes, stride 1" in validated.output
    inspected = runner.invoke(app, ["bundle", "inspect", str(bundle)])
    assert inspected.exit_code == 0, inspected.output
    assert "pairs fitted source" in inspected.output and "PIT (held-out)" in inspected.output
    assert "calibrators: none, logit-adjust" in inspected.output and "| blda+em-prior |" in inspected.output
    figures = json.loads(runner.invoke(app, ["bundle", "inspect", str(bundle), "--json"]).output)
    assert figures["tables"]["pairs"] == C7 * C7 and figures["tables"]["source_pairs_fitted"] > 0

    image = np.asarray(Image.open(next(foreign["tgt_img"].iterdir())))
    truth = np.asarray(Image.open(next(foreign["tgt_lab"].iterdir())))
    served = serve_segment_feedback(models, "foreign", image, truth)
    assert served["feedback"]["labelled_pixels"] == int((truth != 255).sum())  # type: ignore[index]


def test_a_model_without_folders_is_served_raw(foreign: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = runner.invoke(app, create_args(foreign["onnx"], "plain", models, None, "--version", "3"))
    assert result.exit_code == 0, result.output
    assert "calibration: none" in result.output
    manifest = json.loads((models / "plain" / "3" / "manifest.json").read_text())
    assert manifest["calibration"] is None and "calibration.npz" not in manifest["files"]
    again = runner.invoke(app, create_args(foreign["onnx"], "plain", models, None, "--version", "3"))
    assert again.exit_code == 2 and "expected a new version" in again.output
    assert runner.invoke(app, create_args(foreign["onnx"], "plain", models, None)).exit_code == 0
    assert (models / "plain" / "4").is_dir()  # the next version after the highest


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped bundle is not in this checkout")
def test_the_shipped_model_onnx_strided_output(tmp_path: Path) -> None:
    from calibration.classes import CLASSES, LABEL_TO_TRAIN

    ids = np.array([c.label_id for c in CLASSES])
    folders = write_folders(tmp_path / "data", len(CLASSES), (64, 96), (3, 2), label_ids=ids)
    models = tmp_path / "models"
    result = run_blda_without_torch(
        create_args(
            SHIPPED, "shipped", models, folders, "--classes", "cityscapes", "--label-format", "cityscapes-ids",
            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
        )
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((models / "shipped" / "1.0.0" / "manifest.json").read_text())
    assert manifest["output"] == {"name": "logits", "num_classes": 19, "stride": 4}
    assert manifest["input"]["name"] == "image"
    assert [c["name"] for c in manifest["classes"]] == [c.name for c in CLASSES]
    validated = run_blda_without_torch(["bundle", "validate", str(models / "shipped" / "1.0.0")])
    assert validated.returncode == 0 and "stride 4" in validated.stdout, validated.stderr
    image = np.asarray(Image.open(next(folders["tgt_img"].iterdir())))
    truth = LABEL_TO_TRAIN[np.asarray(Image.open(next(folders["tgt_lab"].iterdir())))]
    serve_segment_feedback(models, "shipped", image, truth)


@pytest.mark.parametrize(
    ("head", "telltale"), [("Softmax", "got probabilities"), ("LogSoftmax", "got log-probabilities")]
)
def test_probabilities_are_refused(
    head: str, telltale: str, foreign: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / f"{head}.onnx"
    path.write_bytes(foreign_model(head))
    result = runner.invoke(app, create_args(path, "probs", tmp_path / "models", None))
    assert result.exit_code == 2, result.output
    assert f"{path}: output 'scores': expected logits (unnormalised scores), {telltale}" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "models" / "probs").exists()


def test_wrong_class_counts_name_the_field(foreign: dict[str, Path], tmp_path: Path) -> None:
    six = tmp_path / "six.json"
    six.write_text(json.dumps([f"c{i}" for i in range(6)]))
    models = tmp_path / "models"
    result = runner.invoke(app, create_args(foreign["onnx"], "m", models, None, "--classes", str(six)))
    assert result.exit_code == 2
    assert f"{six}: classes: expected 7 classes (the model's output channels), got 6" in result.output

    assert runner.invoke(app, create_args(foreign["onnx"], "m", models, None)).exit_code == 0
    bundle = models / "m" / "1.0.0"
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["output"]["num_classes"] = 8
    raw["classes"].append({"id": 7, "name": "extra", "color": [0, 0, 0]})
    (bundle / "manifest.json").write_text(json.dumps(raw))
    result = runner.invoke(app, ["bundle", "validate", str(bundle)])
    assert result.exit_code == 2, result.output
    assert f"{bundle / 'manifest.json'}: output.num_classes: expected logits (1, 8, h, w)" in result.output
    assert "got (1, 7," in result.output and "Traceback" not in result.output
    raw["output"].update(num_classes=7, stride=2)
    raw["classes"].pop()
    (bundle / "manifest.json").write_text(json.dumps(raw))
    result = runner.invoke(app, ["bundle", "validate", str(bundle)])
    assert (
        result.exit_code == 2
        and "manifest.json: output.stride: expected logits of 32x32 for a 64x64" in result.output
    )
    raw["classes"].append({"id": 7, "name": "extra", "color": [0, 0, 0]})
    raw["output"].update(num_classes=7, stride=1)  # now the classes list is one too long
    (bundle / "manifest.json").write_text(json.dumps(raw))
    result = runner.invoke(app, ["bundle", "validate", str(bundle)])
    assert result.exit_code == 2 and "manifest.json: classes: expected classes with ids 0..6" in result.output


def test_bad_inputs_are_one_line(foreign: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    with zipfile.ZipFile(checkpoint, "w") as archive:  # torch.save's format: a zip archive
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    cases = [
        (create_args(checkpoint, "m", tmp_path / "m", None), f"{checkpoint}: --onnx: expected an ONNX model onnxruntime can load, got a torch checkpoint"),
        (create_args(foreign["onnx"], "m", tmp_path / "m", None, "--input-name", "image"), "--input-name: expected one of the graph's inputs ['pixels'], got 'image'"),
        (create_args(foreign["onnx"], "m", tmp_path / "m", None, "--source-images", str(foreign["src_img"])), "command line: --source-labels: expected --source-images, --source-labels and --target-images together"),
        (create_args(foreign["onnx"], "m", tmp_path / "m", None, "--mean", "0.5,0.5"), "--mean: expected 3 numbers, got 2"),
        (create_args(foreign["onnx"], "m", tmp_path / "m", foreign, "--label-format", "cityscapes-ids"), "--label-format: expected a model of the 19 Cityscapes classes for cityscapes-ids, got 7"),
        (["bundle", "validate", str(tmp_path / "nowhere")], "expected a bundle directory, but it does not exist"),
    ]  # fmt: skip
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
