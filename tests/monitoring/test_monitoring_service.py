"""The monitoring routes in one process: /metrics, POST /v1/feedback, GET /v1/models/{name}/bias."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import (
    CLASS_NAMES,
    MODEL,
    Expected,
    decode_png,
    manifest,
    model_weights,
    onnx_model,
    png,
    reference_logits,
    require_tool,
    scene,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from calibration.bias import bias_from_confusion, iou_from_confusion
from calibration.bundle import save_bundle
from calibration.tables import CalibrationTables
from service.app import create_app
from service.settings import ServiceSettings

C = len(CLASS_NAMES)
SEGMENT = f"/v1/models/{MODEL}/segment"
# The service takes quantiles from tabulated CDFs (service.telemetry.QuantileTables), the test from the
# core's exact mixtures: they agree to ~1e-5 per pixel.
QUANTILE_RTOL = 1e-4


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model": MODEL, "version": "1", **labels}.items())))]


def segment(client: TestClient, image: np.ndarray, calibrate: bool) -> tuple[str, np.ndarray]:
    response = client.post(
        SEGMENT,
        params={"calibrate": str(calibrate).lower()},
        content=png(image),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"], decode_png(response.content)


@pytest.fixture
def served(client: TestClient, exact_models: tuple[Path, CalibrationTables]):
    """Three images served (two calibrated), with the expected counts and the served masks."""
    tables = exact_models[1]
    weight, bias = model_weights()
    expected = Expected.empty(C)
    requests = []
    for seed, (height, width), calibrate in [(1, (64, 96), True), (2, (48, 52), True), (3, (32, 100), False)]:
        image = scene(height, width, seed)
        request_id, mask = segment(client, image, calibrate)
        masks = expected.add_request(reference_logits(image, weight, bias), tables, calibrate)
        np.testing.assert_array_equal(mask, masks[-1])  # the test's decision is the service's
        requests.append((request_id, masks))
    telemetry = client.app.state.telemetry  # type: ignore[attr-defined]
    store = client.app.state.feedback_store  # type: ignore[attr-defined]
    wait_until(lambda: telemetry.totals[(MODEL, "1")].images == 3 and len(store) == 3, what="the observers")
    return expected, requests


def test_metrics_count_what_was_served(client: TestClient, served) -> None:
    expected, _ = served
    samples = scrape(client)
    assert expected.flipped.sum() > 0
    for d, decision in enumerate(("raw", "calibrated")):
        for c, name in enumerate(CLASS_NAMES):
            labels = {"class": name, "decision": decision}
            assert value(samples, "blda_predicted_pixels_total", **labels) == expected.pixels[d, c]
            assert value(samples, "blda_calibration_flipped_pixels_total", **labels) == expected.flipped[d, c]
            assert value(samples, "blda_positive_quantile_sum", **labels) == pytest.approx(
                expected.u_sum[d, c], rel=QUANTILE_RTOL
            )
            assert value(samples, "blda_anchor_quantile_sum", **labels) == pytest.approx(
                expected.a_sum[d, c], rel=QUANTILE_RTOL
            )
            assert value(samples, "blda_winning_logit_count", **labels) == expected.pixels[d, c]
    for c, name in enumerate(CLASS_NAMES):
        got = value(samples, "blda_calibration_input_pixels_total", **{"class": name})
        assert got == expected.calibration_input[c]
    assert value(samples, "blda_segmented_images_total", calibrated="true") == 2
    route = tuple(sorted({"route": "/v1/models/{name}/segment", "method": "POST", "status": "200"}.items()))
    assert samples[("blda_http_requests_total", route)] == 3
    assert samples[("blda_http_requests_in_flight", ())] == 1  # the scrape itself


def test_feedback_updates_confusion_counts_and_bias_json(client: TestClient, served) -> None:
    expected, requests = served
    rng = np.random.default_rng(7)
    for i, (request_id, masks) in enumerate(requests):
        truth = np.where(rng.random(masks[0].shape) < 0.3, rng.integers(0, C, masks[0].shape), masks[0])
        truth = truth.astype(np.uint8)
        truth[:2] = 255
        if i == 1:  # JSON + base64
            body = {"request_id": request_id, "mask": base64.b64encode(png(truth)).decode()}
            response = client.post("/v1/feedback", json=body)
        else:  # multipart
            files = {"mask": ("truth.png", png(truth), "image/png")}
            response = client.post("/v1/feedback", data={"request_id": request_id}, files=files)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["labelled_pixels"] == int((truth != 255).sum())
        assert answer["calibrated"] == (len(masks) == 2)
        expected.add_feedback(masks, truth)
        accuracy = (masks[0] == truth)[truth != 255].mean()
        assert answer["pixel_accuracy"]["raw"] == pytest.approx(accuracy)
    samples = scrape(client)
    for d, decision in enumerate(("raw", "calibrated")):
        for t, true_name in enumerate(CLASS_NAMES):
            for p, name in enumerate(CLASS_NAMES):
                got = value(
                    samples, "blda_feedback_confusion_pixels_total", decision=decision, true_class=true_name,
                    **{"class": name},
                )  # fmt: skip
                assert got == expected.confusion[d, t, p]
    report = client.get(f"/v1/models/{MODEL}/bias").json()
    assert report["model"] == MODEL and report["active_version"] == "1"
    figures = report["versions"]["1"]
    assert figures["images"] == 3 and figures["feedback_images"] == 3
    for d, decision in enumerate(("raw", "calibrated")):
        iou = iou_from_confusion(expected.confusion[d])
        bias = bias_from_confusion(expected.confusion[d])
        share = expected.pixels[d] / expected.pixels[d].sum()
        for c, entry in enumerate(figures["classes"]):
            assert entry[decision]["feedback_iou"] == (pytest.approx(iou[c]) if np.isfinite(iou[c]) else None)
            assert entry[decision]["feedback_bias"] == pytest.approx(bias[c])
            assert entry[decision]["predicted_share"] == pytest.approx(share[c])
            mean_u = expected.u_sum[d, c] / expected.pixels[d, c] - 0.5 if expected.pixels[d, c] else None
            assert entry[decision]["positive_quantile_mean_minus_half"] == pytest.approx(mean_u, abs=1e-5)
    assert figures["flip_rate"] == pytest.approx(expected.flipped[0].sum() / expected.calibration_input.sum())


def test_feedback_errors_are_problem_details(client: TestClient, served) -> None:
    _, requests = served
    request_id, masks = requests[0]
    good = png(masks[0].astype(np.uint8))

    def post(rid: str, data: bytes):
        return client.post(
            "/v1/feedback", data={"request_id": rid}, files={"mask": ("m.png", data, "image/png")}
        )

    unknown = post("no-such-request", good)
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["type"] == "/problems/request-not-found"
    assert "served in the last" in unknown.json()["detail"]

    wrong_size = post(request_id, png(np.zeros((8, 8), np.uint8)))
    assert wrong_size.status_code == 422
    assert wrong_size.json()["type"] == "/problems/invalid-mask"
    assert "expected 96 x 64 pixels" in wrong_size.json()["detail"]
    bad_ids = post(request_id, png(np.full(masks[0].shape, 42, np.uint8)))
    assert bad_ids.status_code == 422 and "got [42]" in bad_ids.json()["detail"]

    assert post(request_id, good).status_code == 200  # a rejected mask did not use up the request
    again = post(request_id, good)
    assert again.status_code == 409
    assert again.json()["type"] == "/problems/feedback-already-given"

    assert (
        client.post("/v1/feedback", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    )
    bad_json = client.post("/v1/feedback", json={"request_id": requests[1][0], "mask": "***"})
    assert bad_json.status_code == 422 and "base64" in bad_json.json()["detail"]
    missing = client.post("/v1/feedback", json={"mask": ""})
    assert missing.status_code == 422 and "request_id" in missing.json()["detail"]
    no_file = client.post("/v1/feedback", data={"request_id": requests[1][0]}, files={"other": ("x", b"1")})
    assert no_file.status_code == 422 and "mask" in no_file.json()["detail"]


def test_bias_of_an_unknown_model_is_404(client: TestClient) -> None:
    response = client.get("/v1/models/nope/bias")
    assert response.status_code == 404
    assert response.json()["type"] == "/problems/model-not-found"


def test_labels_are_bounded(client: TestClient, served) -> None:
    _, requests = served
    client.get("/no/such/path")
    samples = scrape(client)
    label_values = {v for _, labels in samples for _, v in labels}
    assert not any(request_id in label_values for request_id, _ in requests)
    routes = {dict(labels).get("route") for name, labels in samples if name == "blda_http_requests_total"}
    assert "unmatched" in routes and "/no/such/path" not in routes


def test_promtool_accepts_the_scrape(client: TestClient, served) -> None:
    promtool = require_tool("promtool")
    text = client.get("/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_version_loaded_by_a_reload_appears_at_zero_on_the_next_scrape(
    tmp_path: Path, exact_models: tuple[Path, CalibrationTables]
) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(exact_models[0], models_dir)
    settings = ServiceSettings(
        models_dir=models_dir, intra_op_threads=1, cpu_threads=2, execution_provider="cpu"
    )
    with TestClient(create_app(settings)) as client:
        weight, bias = model_weights()
        save_bundle(
            models_dir,
            onnx_model(weight, bias),
            exact_models[1],
            manifest().model_copy(update={"version": "2"}),
        )
        client.app.state.registry.reload(MODEL)  # type: ignore[attr-defined]  # what POST .../reload does
        samples = scrape(client)
        labels = tuple(sorted({"model": MODEL, "version": "2", "class": "sky", "decision": "raw"}.items()))
        assert samples[("blda_predicted_pixels_total", labels)] == 0
        info = tuple(sorted({"model": MODEL, "version": "2", "calibration": "true"}.items()))
        assert samples[("blda_model_info", info)] == 1
