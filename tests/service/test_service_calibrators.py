"""calibrator= per request: validated against the bundle's calibrators, the decision the core's, the
calibrator in the X-Calibrator header and the JSON body, and a bounded metric label."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import NUM_CLASSES, manifest, png_bytes, random_tables, scene, settings_for, tiny_model
from test_service_segment import PNG, mask_of, reference_mask

from calibration.bundle import CalibrationSpec, save_bundle
from calibration.calibrators.calibrator import Calibrator
from service.app import create_app
from service.records import SegmentationRecord
from service.telemetry import Telemetry

# A strong offset towards class 0: logit adjustment visibly changes the decision.
OFFSET = np.array([3.0] + [0.0] * (NUM_CLASSES - 1))


def calibrated_bundle(models_dir: Path, default: str = "logit-adjust") -> Path:
    fitted = {
        "none": Calibrator("none"),
        "logit-adjust": Calibrator("logit-adjust", bias=OFFSET, fit={"strength": 1.0}),
        "blda": Calibrator("blda", tau=0.5),
    }
    spec = CalibrationSpec(
        tau_default=0.2, num_knots=64, calibrators=list(fitted), default_calibrator=default
    )
    base = manifest("tiny", "1")
    return save_bundle(
        models_dir, tiny_model(0), random_tables(0), base.model_copy(update={"calibration": spec}), fitted
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    root = tmp_path_factory.mktemp("calibrators") / "models"
    bundle = calibrated_bundle(root)
    with TestClient(create_app(settings_for(root))) as client:
        yield client, bundle


def offset_reference(bundle: Path, rgb: np.ndarray) -> np.ndarray:
    """argmax(upsampled logits + b), from the raw reference's logits: the raw reference with the offset."""
    import onnxruntime as ort
    from PIL import Image

    from calibration.bundle import load_bundle
    from calibration.segmentation import upsample_bilinear

    loaded = load_bundle(bundle)
    spec = loaded.manifest.input
    height, width = rgb.shape[:2]
    size = (max(8, int(height / 8 + 0.5) * 8), max(8, int(width / 8 + 0.5) * 8))
    resized = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float64)
    x = ((resized / spec.pixel_scale - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(loaded.model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.astype(np.float32)})
    up = upsample_bilinear(logits[0], (min(height, 2 * size[0]), min(width, 2 * size[1])))
    small = (up + OFFSET[:, None, None]).argmax(0)
    h, w = small.shape
    rows = (2 * np.arange(height) + 1) * h // (2 * height)
    cols = (2 * np.arange(width) + 1) * w // (2 * width)
    return small[rows][:, cols].astype(np.uint8)


def test_the_manifest_default_serves_and_is_named(served: tuple[TestClient, Path]) -> None:
    client, bundle = served
    rgb = scene(61, 97, seed=3)
    response = client.post("/v1/models/tiny/segment", content=png_bytes(rgb), headers=PNG)
    assert response.status_code == 200, response.text
    assert response.headers["x-calibrator"] == "logit-adjust"
    assert "x-calibration-tau" not in response.headers  # no tau for a calibrator without tables
    got = mask_of(response)
    np.testing.assert_array_equal(got, offset_reference(bundle, rgb))
    raw = mask_of(client.post("/v1/models/tiny/segment?calibrate=false", content=png_bytes(rgb), headers=PNG))
    assert (got != raw).any(), "the offset must change the decision here"


def test_calibrator_blda_is_the_core_rule_at_the_request_tau(served: tuple[TestClient, Path]) -> None:
    client, bundle = served
    rgb = scene(61, 97, seed=4)
    response = client.post(
        "/v1/models/tiny/segment?calibrator=blda&tau=0.8&format=json", content=png_bytes(rgb), headers=PNG
    )
    body = response.json()
    assert response.headers["x-calibrator"] == "blda" and response.headers["x-calibration-tau"] == "0.8"
    assert body["calibrator"] == "blda" and body["tau"] == 0.8 and body["calibrated"] is True
    png = client.post("/v1/models/tiny/segment?calibrator=blda&tau=0.8", content=png_bytes(rgb), headers=PNG)
    np.testing.assert_array_equal(mask_of(png), reference_mask(bundle, rgb, calibrate=True, tau=0.8))


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("calibrator=platt", "expected one of ['none', 'logit-adjust', 'blda']"),
        ("calibrate=false&calibrator=blda", "calibrate=false contradicts calibrator=blda"),
    ],
)
def test_bad_calibrators_are_422_problems_naming_the_options(
    served: tuple[TestClient, Path], query: str, detail: str
) -> None:
    client, _ = served
    response = client.post(f"/v1/models/tiny/segment?{query}", content=png_bytes(scene(20, 30)), headers=PNG)
    assert response.status_code == 422
    problem = response.json()
    assert problem["type"].endswith("invalid-calibrator")
    assert detail in problem["detail"]


def test_calibrate_false_is_none_and_the_models_route_lists_the_calibrators(
    served: tuple[TestClient, Path],
) -> None:
    client, _ = served
    response = client.post(
        "/v1/models/tiny/segment?calibrate=false", content=png_bytes(scene(20, 30)), headers=PNG
    )
    assert response.headers["x-calibrator"] == "none"
    info = client.get("/v1/models/tiny").json()
    calibration = info["versions"][0]["calibration"]
    assert calibration["calibrators"] == ["none", "logit-adjust", "blda"]
    assert calibration["default_calibrator"] == "logit-adjust"


def test_the_calibrator_is_a_label_of_the_image_counter() -> None:
    tables = random_tables(0)
    telemetry = Telemetry()
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    telemetry.register_version("m", "1", names, tables, ["none", "logit-adjust", "blda"])
    reg = telemetry.registry
    labels = {"model": "m", "version": "1"}
    assert reg.get_sample_value("blda_calibrator_images_total", {**labels, "calibrator": "blda"}) == 0
    decision = np.zeros((4, 6), np.uint8)
    for name in ("logit-adjust", "logit-adjust", "none"):
        telemetry.observe_segmentation(
            SegmentationRecord(
                request_id="r",
                model_name="m",
                model_version="1",
                raw_decision=decision,
                calibrated_decision=None if name == "none" else decision,
                winning_logits=np.ones((4, 6), np.float32),
                logits=np.zeros((NUM_CLASSES, 4, 6), np.float32),
                tables=tables,
                input_size=(8, 12),
                calibrate=name != "none",
                tau=0.2,
                calibrator=name,
            )
        )
    assert reg.get_sample_value("blda_calibrator_images_total", {**labels, "calibrator": "logit-adjust"}) == 2
    assert reg.get_sample_value("blda_calibrator_images_total", {**labels, "calibrator": "none"}) == 1
