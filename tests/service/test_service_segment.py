"""POST /v1/segment and /v1/models/{name}/segment through the HTTP stack (TestClient)."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_helpers import (
    ADMIN_KEY,
    NUM_CLASSES,
    BundleFactory,
    encode,
    png_bytes,
    png_header_only,
    scene,
    settings_for,
)

from calibration.alignment import calibrated_decision
from calibration.bundle import load_bundle
from calibration.segmentation import resize_nearest, upsample_bilinear
from service.app import create_app
from service.records import SegmentationRecord

PNG = {"content-type": "image/png"}


def mask_of(response: object) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)))  # type: ignore[attr-defined]


def reference_mask(bundle_dir: Path, rgb: np.ndarray, calibrate: bool, tau: float) -> np.ndarray:
    """The service's answer computed on its own: onnxruntime, the core's upsample (tested against a slow loop
    and torch) to the decision size, the core's rule, a slow-loop nearest resize."""
    bundle = load_bundle(bundle_dir)
    spec = bundle.manifest.input
    height, width = rgb.shape[:2]
    # multiple_of = 8 in the test manifests; a half rounds up
    size = (max(8, int(height / 8 + 0.5) * 8), max(8, int(width / 8 + 0.5) * 8))
    resized = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float64)
    x = ((resized / spec.pixel_scale - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.astype(np.float32)})
    assert bundle.tables is not None
    # decision size: the input size x 2 (decision_scale), at most the image's size
    up = upsample_bilinear(logits[0], (min(height, 2 * size[0]), min(width, 2 * size[1])))
    small = calibrated_decision(up, bundle.tables.shifts, tau=tau) if calibrate else up.argmax(0)
    h, w = small.shape
    out = np.empty((height, width), dtype=np.uint8)
    for i in range(height):
        for j in range(width):
            out[i, j] = small[(2 * i + 1) * h // (2 * height), (2 * j + 1) * w // (2 * width)]
    return out


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_calibration_changes_exactly_what_the_core_rule_changes(
    client: TestClient, models_dir: Path, tau: float
) -> None:
    rgb = scene(122, 203, seed=5)  # not a multiple of the stride: both resizes are exercised
    data = png_bytes(rgb)
    raw = client.post("/v1/models/tiny/segment?calibrate=false", content=data, headers=PNG)
    cal = client.post(f"/v1/models/tiny/segment?calibrate=true&tau={tau}", content=data, headers=PNG)
    assert raw.status_code == cal.status_code == 200
    assert raw.headers["x-calibrated"] == "false" and cal.headers["x-calibrated"] == "true"
    raw_mask, cal_mask = mask_of(raw), mask_of(cal)
    assert raw_mask.shape == cal_mask.shape == (122, 203)
    expected_raw = reference_mask(models_dir / "tiny" / "2", rgb, calibrate=False, tau=tau)
    expected_cal = reference_mask(models_dir / "tiny" / "2", rgb, calibrate=True, tau=tau)
    assert np.array_equal(raw_mask, expected_raw)
    assert np.array_equal(cal_mask, expected_cal)
    changed = raw_mask != cal_mask
    assert changed.any(), "the test bundle must make calibration change some pixels"
    assert np.array_equal(changed, expected_raw != expected_cal)


def test_png_mask_has_input_size_valid_ids_and_palette(client: TestClient) -> None:
    response = client.post("/v1/segment", content=png_bytes(scene(57, 91)), headers=PNG)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "P" and image.size == (91, 57)
    mask = np.asarray(image)
    assert mask.max() < NUM_CLASSES
    detail = client.get("/v1/models/tiny").json()
    palette = np.array(image.getpalette()[: NUM_CLASSES * 3]).reshape(NUM_CLASSES, 3)  # type: ignore[index]
    assert palette.tolist() == [c["color"] for c in detail["classes"]]


def test_headers_name_the_model_and_the_stages(client: TestClient) -> None:
    response = client.post(
        "/v1/segment", content=png_bytes(scene(40, 64)), headers={**PNG, "X-Request-Id": "abc-1"}
    )
    # The id is the server's own; the client's is only echoed for correlation.
    assert response.headers["x-client-request-id"] == "abc-1"
    assert response.headers["x-request-id"] != "abc-1" and len(response.headers["x-request-id"]) == 32
    assert response.headers["x-model-name"] == "tiny"
    assert response.headers["x-model-version"] == "2"  # the highest version
    assert response.headers["x-calibrated"] == "true"  # the manifest's default
    assert response.headers["x-calibration-tau"] == "0.2"
    stages = [part.split(";")[0] for part in response.headers["server-timing"].split(", ")]
    assert stages == ["decode", "infer", "calibrate", "encode"]
    fresh = client.post(
        "/v1/segment", content=png_bytes(scene(40, 64)), headers={**PNG, "X-Request-Id": "bad id!"}
    )
    assert fresh.headers["x-request-id"] != "bad id!" and len(fresh.headers["x-request-id"]) == 32
    assert "x-client-request-id" not in fresh.headers  # not plain: not echoed


def test_json_format_counts_and_rle_agree_with_the_png(client: TestClient) -> None:
    data = png_bytes(scene(50, 70, seed=2))
    png = mask_of(client.post("/v1/segment?calibrate=true", content=data, headers=PNG))
    response = client.post("/v1/segment?calibrate=true&format=json", content=data, headers=PNG)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert (
        body["model"] == "tiny"
        and body["version"] == "2"
        and body["calibrated"] is True
        and body["tau"] == 0.2
    )
    rle = body["mask"]
    assert rle["encoding"] == "rle-row-major" and rle["size"] == [50, 70]
    mask = np.repeat(rle["values"], rle["lengths"]).reshape(50, 70)
    assert np.array_equal(mask, png)
    counts = body["class_counts"]
    assert list(counts) == body["classes"] == [f"class{i}" for i in range(NUM_CLASSES)]
    assert [counts[f"class{i}"] for i in range(NUM_CLASSES)] == np.bincount(
        png.ravel(), minlength=19
    ).tolist()
    assert body["request_id"] == response.headers["x-request-id"]


def rle_mask(rle: dict[str, object]) -> np.ndarray:
    height, width = rle["size"]  # type: ignore[misc]
    return np.repeat(rle["values"], rle["lengths"]).reshape(height, width)  # type: ignore[call-overload]


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_json_carries_both_decisions_and_the_changed_pixels(client: TestClient, tau: float) -> None:
    """One request answers raw and calibrated: the demo page compares them without a second request."""
    data = png_bytes(scene(50, 70, seed=3))
    raw_png = mask_of(client.post("/v1/segment?calibrate=false", content=data, headers=PNG))
    cal_png = mask_of(client.post(f"/v1/segment?calibrate=true&tau={tau}", content=data, headers=PNG))
    body = client.post(
        f"/v1/segment?calibrate=true&tau={tau}&format=json&raw_mask=true", content=data, headers=PNG
    ).json()
    assert np.array_equal(rle_mask(body["mask"]), cal_png)
    assert np.array_equal(rle_mask(body["raw_mask"]), raw_png)
    assert body["changed_pixels"] == int((raw_png != cal_png).sum()) > 0
    assert list(body["raw_class_counts"].values()) == np.bincount(raw_png.ravel(), minlength=19).tolist()
    assert body["decision_size"] == [50, 70]  # a small image is decided at its own size
    plain = client.post("/v1/segment?calibrate=false&format=json", content=data, headers=PNG).json()
    assert plain["changed_pixels"] is None and "raw_mask" not in plain
    assert plain["raw_class_counts"] == plain["class_counts"]


def test_a_version_can_be_chosen_per_request(client: TestClient) -> None:
    data = png_bytes(scene(30, 40, seed=6))
    for version in ("1", "2"):
        response = client.post(f"/v1/models/tiny/segment?version={version}", content=data, headers=PNG)
        assert response.status_code == 200 and response.headers["x-model-version"] == version
    one = client.post("/v1/segment?version=1", content=data, headers=PNG)
    two = client.post("/v1/segment", content=data, headers=PNG)
    assert one.headers["x-model-version"] == "1" and two.headers["x-model-version"] == "2"
    assert one.content != two.content  # other weights: the version really served
    missing = client.post("/v1/models/tiny/segment?version=7", content=data, headers=PNG)
    assert missing.status_code == 404 and missing.json()["type"] == "/problems/version-not-found"
    assert "expected one of the versions ['1', '2'] of tiny, got '7'" in missing.json()["detail"]


def test_decisions_are_made_above_the_logit_grid(tmp_path: Path, make_bundle: BundleFactory) -> None:
    """A fixed 32 x 64 input (8 x 16 logits) and a 128 x 256 image: decided at 64 x 128 (input x 2), so
    the mask has 2-pixel steps, not the 16-pixel blocks of the logit grid."""
    make_bundle(tmp_path / "models", "fixed", "1", size=(32, 64))
    rgb = scene(128, 256, seed=4)
    with TestClient(create_app(settings_for(tmp_path / "models", default_model="fixed"))) as fixed:
        body = fixed.post(
            "/v1/segment?calibrate=false&format=json", content=png_bytes(rgb), headers=PNG
        ).json()
    assert body["decision_size"] == [64, 128]
    mask = rle_mask(body["mask"])
    cols = np.flatnonzero((mask[:, 1:] != mask[:, :-1]).any(axis=0)) + 1  # columns where a label changes
    assert cols.size and (cols % 2 == 0).all()  # steps of the 64 x 128 decision, 2 image pixels wide
    assert (cols % 16 != 0).mean() > 0.5  # most transitions inside the 16-pixel cells of the logit grid


def test_the_mask_can_come_at_the_decision_size(tmp_path: Path, make_bundle: BundleFactory) -> None:
    """mask_size=decision: the decision itself (64 x 128 for a 32 x 64 input), the one the image-size
    mask is the nearest resize of; sizes in the headers; counts still of the image's pixels."""
    make_bundle(tmp_path / "models", "fixed", "1", size=(32, 64))
    data = png_bytes(scene(200, 300, seed=5))
    with TestClient(create_app(settings_for(tmp_path / "models", default_model="fixed"))) as fixed:
        full = fixed.post("/v1/segment?calibrate=false", content=data, headers=PNG)
        small = fixed.post("/v1/segment?calibrate=false&mask_size=decision", content=data, headers=PNG)
        body = fixed.post(
            "/v1/segment?calibrate=false&format=json&mask_size=decision", content=data, headers=PNG
        ).json()
        bad = fixed.post("/v1/segment?mask_size=tiny", content=data, headers=PNG)
    assert full.headers["x-mask-size"] == full.headers["x-image-size"] == "200x300"
    assert small.headers["x-mask-size"] == "64x128" and small.headers["x-image-size"] == "200x300"
    decision = mask_of(small)
    assert decision.shape == (64, 128)
    assert np.array_equal(resize_nearest(decision, 200, 300), mask_of(full))
    assert body["mask"]["size"] == [64, 128] and np.array_equal(rle_mask(body["mask"]), decision)
    assert sum(body["class_counts"].values()) == 200 * 300
    assert bad.status_code == 422


def test_multipart_and_every_format_and_mode(client: TestClient) -> None:
    rgb = scene(48, 64, seed=4)
    image = Image.fromarray(rgb)
    bodies = {
        "png-rgb": (encode(image, "PNG"), "image/png"),
        "png-l": (encode(image.convert("L"), "PNG"), "image/png"),
        "png-rgba": (encode(image.convert("RGBA"), "PNG"), "image/png"),
        "png-p": (encode(image.convert("P"), "PNG"), "image/png"),
        "jpeg": (encode(image, "JPEG"), "image/jpeg"),
        "webp": (encode(image, "WEBP"), "image/webp"),
    }
    for name, (data, kind) in bodies.items():
        raw = client.post("/v1/segment?calibrate=false", content=data, headers={"content-type": kind})
        multipart = client.post("/v1/segment?calibrate=false", files={"file": (f"{name}.img", data, kind)})
        assert raw.status_code == multipart.status_code == 200, (name, raw.text, multipart.text)
        assert np.array_equal(mask_of(raw), mask_of(multipart)), name
        assert mask_of(raw).shape == (48, 64), name


def test_model_without_tables_defaults_to_raw_and_refuses_calibrate(client: TestClient) -> None:
    data = png_bytes(scene(32, 32))
    response = client.post("/v1/models/plain/segment", content=data, headers=PNG)
    assert response.status_code == 200 and response.headers["x-calibrated"] == "false"
    refused = client.post("/v1/models/plain/segment?calibrate=true", content=data, headers=PNG)
    assert refused.status_code == 422
    assert refused.json()["type"] == "/problems/calibration-unavailable"


def test_observers_receive_one_record_per_request(models_dir: Path) -> None:
    app = create_app(settings_for(models_dir))
    records: list[SegmentationRecord] = []
    seen = threading.Event()

    def observe(record: SegmentationRecord) -> None:
        records.append(record)
        seen.set()

    def broken(record: SegmentationRecord) -> None:
        raise RuntimeError("observer bug")

    app.state.segmentation_observers.extend([broken, observe])
    with TestClient(app) as client:
        response = client.post("/v1/segment?tau=0.5", content=png_bytes(scene(61, 83)), headers=PNG)
        assert response.status_code == 200
        assert seen.wait(10)
    (record,) = records
    assert record.request_id == response.headers["x-request-id"]
    assert (record.model_name, record.model_version, record.calibrate, record.tau) == ("tiny", "2", True, 0.5)
    assert record.input_size == (61, 83)
    assert record.logits.shape[0] == NUM_CLASSES
    # Decisions at the decision size (here the image's: it is small), on the upsampled logits.
    up = upsample_bilinear(record.logits, (61, 83))
    assert record.raw_decision.shape == (61, 83) == record.winning_logits.shape
    assert np.array_equal(record.raw_decision, up.argmax(0))
    assert np.array_equal(record.winning_logits, up.max(0))
    assert record.calibrated_decision is not None and record.tables is not None
    cal = calibrated_decision(up, record.tables.shifts, tau=0.5)
    assert np.array_equal(record.calibrated_decision, cal)
    assert record.calibrated_logits is not None
    assert np.array_equal(record.calibrated_logits, np.take_along_axis(up, cal[None], 0)[0])
    assert record.timings.infer > 0


# Every bad input: its status and its problem type.
VALID = png_bytes(scene(32, 48))

CT = "content-type"
BAD_REQUESTS = [
    ("garbage", "", {"content": b"\x00garbage" * 10, "headers": PNG}, 422, "invalid-image"),
    ("empty", "", {"content": b"", "headers": PNG}, 422, "invalid-image"),
    ("truncated", "", {"content": VALID[: len(VALID) // 2], "headers": PNG}, 422, "invalid-image"),
    ("header only 40000x40000", "", {"content": png_header_only(40_000, 40_000), "headers": PNG}, 422,
     "image-too-large"),
    ("header only 5000x4000", "", {"content": png_header_only(5000, 4000), "headers": PNG}, 422,
     "image-too-large"),
    ("gif", "", {"content": b"GIF89a" + bytes(64), "headers": {CT: "image/gif"}}, 415,
     "unsupported-media-type"),
    ("no content type", "", {"content": VALID, "headers": {CT: ""}}, 415, "unsupported-media-type"),
    ("text", "", {"content": b"hello", "headers": {CT: "text/plain"}}, 415, "unsupported-media-type"),
    ("png as octet-stream", "", {"content": VALID, "headers": {CT: "application/octet-stream"}}, 415,
     "unsupported-media-type"),
    ("multipart without file", "", {"data": {"other": "x"}, "files": {"x": ("a", b"1", "text/plain")}}, 422,
     "invalid-request"),
    ("multipart file not an image", "", {"files": {"file": ("a.png", b"nope", "image/png")}}, 422,
     "invalid-image"),
    ("bad multipart", "", {"content": b"--x\r\nbroken", "headers": {CT: "multipart/form-data"}}, 422,
     "invalid-request"),
    ("tau too high", "?tau=1.5", {"content": VALID, "headers": PNG}, 422, "invalid-request"),
    ("tau negative", "?tau=-0.1", {"content": VALID, "headers": PNG}, 422, "invalid-request"),
    ("tau nan", "?tau=nan", {"content": VALID, "headers": PNG}, 422, "invalid-request"),
    ("tau text", "?tau=abc", {"content": VALID, "headers": PNG}, 422, "invalid-request"),
    ("calibrate text", "?calibrate=maybe", {"content": VALID, "headers": PNG}, 422, "invalid-request"),
    ("format", "?format=gif", {"content": VALID, "headers": PNG}, 422, "invalid-request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "query", "kwargs", "status", "slug"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
@pytest.mark.parametrize("route", ["/v1/segment", "/v1/models/tiny/segment"])
def test_bad_input_gets_its_status_and_problem(
    client: TestClient, route: str, case: str, query: str, kwargs: dict[str, object], status: int, slug: str
) -> None:
    response = client.post(route + query, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    assert body["title"] and body["detail"] and body["request_id"] == response.headers["x-request-id"]
    described = client.get(body["type"]).json()
    assert described["status"] == status


def test_byte_limit_from_content_length_and_while_reading(models_dir: Path) -> None:
    with TestClient(create_app(settings_for(models_dir, max_body_bytes=4096))) as client:
        big = png_bytes(scene(200, 200))
        assert len(big) > 4096
        response = client.post("/v1/segment", content=big, headers=PNG)
        assert response.status_code == 413 and response.json()["type"] == "/problems/payload-too-large"
        assert "at most 4096 bytes" in response.json()["detail"]

        def chunks() -> object:  # no Content-Length: the limit applies while reading
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        streamed = client.post("/v1/segment", content=chunks(), headers=PNG)
        assert streamed.status_code == 413
        multipart = client.post("/v1/segment", files={"file": ("a.png", big, "image/png")})
        assert multipart.status_code == 413


def test_pixel_limit_is_a_422(models_dir: Path) -> None:
    with TestClient(create_app(settings_for(models_dir, max_image_pixels=1000))) as client:
        response = client.post("/v1/segment", content=png_bytes(scene(40, 40)), headers=PNG)
        assert response.status_code == 422
        assert response.json()["type"] == "/problems/image-too-large"
        assert "got 40 x 40 = 1600" in response.json()["detail"]


def test_unknown_model_is_a_404(client: TestClient) -> None:
    response = client.post("/v1/models/nope/segment", content=VALID, headers=PNG)
    assert response.status_code == 404
    body = response.json()
    assert (
        body["type"] == "/problems/model-not-found" and "nope" in body["detail"] and "tiny" in body["detail"]
    )


def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["type"] == "/problems/not-found"
    wrong = client.get("/v1/segment")
    assert wrong.status_code == 405 and wrong.json()["type"] == "/problems/method-not-allowed"


def test_openapi_docs_and_demo_page(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    segment = schema["paths"]["/v1/models/{name}/segment"]["post"]
    assert set(segment["requestBody"]["content"]) == {
        "multipart/form-data",
        "image/png",
        "image/jpeg",
        "image/webp",
    }
    assert {p["name"] for p in segment["parameters"]} == {
        "name",
        "calibrate",
        "calibrator",
        "tau",
        "format",
        "raw_mask",
        "version",
        "record",
        "mask_size",
    }
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/models" in page.text and "calibrate" in page.text
    assert json.loads(client.get("/problems/payload-too-large").text)["status"] == 413


def test_admin_key_is_not_needed_for_segmenting(client: TestClient) -> None:
    headers = {**PNG, "X-API-Key": ADMIN_KEY}
    assert client.post("/v1/segment", content=VALID, headers=headers).status_code == 200


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 "]),
    body=st.binary(max_size=600),
    cut=st.integers(0, len(VALID)),
)
def test_arbitrary_bytes_never_cause_a_server_error(
    client: TestClient, prefix: bytes, body: bytes, cut: int
) -> None:
    for data in (prefix + body, VALID[:cut] + body):
        response = client.post("/v1/segment", content=data, headers=PNG)
        assert response.status_code in (200, 422), response.text
        if response.status_code == 422:
            assert response.json()["type"] in ("/problems/invalid-image", "/problems/image-too-large")


def test_micro_batching_gives_the_same_masks(models_dir: Path) -> None:
    images = [png_bytes(scene(64, 96, seed=s)) for s in range(6)]
    with TestClient(create_app(settings_for(models_dir))) as plain:
        expected = [mask_of(plain.post("/v1/segment", content=data, headers=PNG)) for data in images]
    batched_settings = settings_for(
        models_dir, batch_max_size=4, batch_max_wait_ms=20.0, max_concurrent_inferences=2
    )
    with TestClient(create_app(batched_settings)) as batched, ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda data: batched.post("/v1/segment", content=data, headers=PNG), images)
        )
    for response, mask in zip(responses, expected, strict=True):
        assert response.status_code == 200
        assert np.array_equal(mask_of(response), mask)


def test_a_server_fault_is_a_500_problem_with_the_request_id(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_run(self: object, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    with TestClient(create_app(settings_for(models_dir)), raise_server_exceptions=False) as client:
        monkeypatch.setattr("service.inference.ServedModel.run", broken_run)
        response = client.post("/v1/segment", content=VALID, headers={**PNG, "X-Request-Id": "trace-500"})
    assert response.status_code == 500
    body = response.json()
    assert (
        body["type"] == "/problems/internal-error" and body["request_id"] == response.headers["x-request-id"]
    )
    assert response.headers["x-client-request-id"] == "trace-500"
    assert "device lost" not in response.text  # internals stay in the log


def test_too_many_requests_in_progress_is_a_503_with_retry_after(models_dir: Path) -> None:
    with TestClient(create_app(settings_for(models_dir, max_pending_requests=3))) as client:
        runner = client.app.state.runner  # type: ignore[attr-defined]
        runner.pending = 3  # three requests in progress elsewhere
        response = client.post("/v1/segment", content=VALID, headers=PNG)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["type"] == "/problems/overloaded"
        assert runner.pending == 3
        runner.pending = 2
        assert client.post("/v1/segment", content=VALID, headers=PNG).status_code == 200
        assert client.post("/v1/segment", content=b"junk", headers=PNG).status_code == 422
        assert runner.pending == 2  # released after success and failure alike
