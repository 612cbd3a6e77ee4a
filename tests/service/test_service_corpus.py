"""The bad-input corpus: each input is a 4xx problem document whose type names the problem and whose
detail says what was expected."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import ADMIN_KEY, png_bytes, png_header_only, scene

PNG = {"content-type": "image/png"}
GOOD = png_bytes(scene(24, 32))

# (name, method, path, request keyword arguments, status, problem slug)
CORPUS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("junk bytes", "POST", "/v1/segment", {"content": b"junk" * 50, "headers": PNG}, 422, "invalid-image"),
    (
        "truncated PNG",
        "POST",
        "/v1/segment",
        {"content": GOOD[: len(GOOD) // 2], "headers": PNG},
        422,
        "invalid-image",
    ),
    ("empty body", "POST", "/v1/segment", {"content": b"", "headers": PNG}, 422, "invalid-image"),
    (
        "40000x40000 header",
        "POST",
        "/v1/segment",
        {"content": png_header_only(40000, 40000), "headers": PNG},
        422,
        "image-too-large",
    ),
    (
        "text/plain",
        "POST",
        "/v1/segment",
        {"content": b"x", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported-media-type",
    ),
    ("no content type", "POST", "/v1/segment", {"content": GOOD}, 415, "unsupported-media-type"),
    ("tau above 1", "POST", "/v1/segment?tau=5", {"content": GOOD, "headers": PNG}, 422, "invalid-request"),
    ("negative tau", "POST", "/v1/segment?tau=-1", {"content": GOOD, "headers": PNG}, 422, "invalid-request"),
    (
        "format gif",
        "POST",
        "/v1/segment?format=gif",
        {"content": GOOD, "headers": PNG},
        422,
        "invalid-request",
    ),
    (
        "calibrate maybe",
        "POST",
        "/v1/segment?calibrate=maybe",
        {"content": GOOD, "headers": PNG},
        422,
        "invalid-request",
    ),
    (
        "calibrate without tables",
        "POST",
        "/v1/models/plain/segment?calibrate=true",
        {"content": GOOD, "headers": PNG},
        422,
        "calibration-unavailable",
    ),
    (
        "multipart without file",
        "POST",
        "/v1/segment",
        {"data": {"other": "1"}, "files": {"x": ("x", b"1")}},
        422,
        "invalid-request",
    ),
    (
        "unknown model",
        "POST",
        "/v1/models/nope/segment",
        {"content": GOOD, "headers": PNG},
        404,
        "model-not-found",
    ),
    (
        "model %2E%2E",
        "POST",
        "/v1/models/%2E%2E/segment",
        {"content": GOOD, "headers": PNG},
        422,
        "invalid-request",
    ),
    ("model .hidden", "GET", "/v1/models/.hidden", {}, 422, "invalid-request"),
    (
        "activate unknown version",
        "POST",
        "/v1/models/tiny/versions/9/activate",
        {"headers": {"X-API-Key": ADMIN_KEY}},
        404,
        "version-not-found",
    ),
    ("admin without key", "POST", "/v1/models/tiny/reload", {}, 401, "unauthorized"),
    (
        "admin with a wrong key",
        "POST",
        "/v1/models/tiny/reload",
        {"headers": {"X-API-Key": "no"}},
        403,
        "forbidden",
    ),
    (
        "feedback text/plain",
        "POST",
        "/v1/feedback",
        {"content": b"x", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported-media-type",
    ),
    (
        "feedback bad JSON",
        "POST",
        "/v1/feedback",
        {"content": b"{", "headers": {"content-type": "application/json"}},
        422,
        "invalid-request",
    ),
    ("feedback JSON list", "POST", "/v1/feedback", {"json": [1, 2]}, 422, "invalid-request"),
    ("feedback without id", "POST", "/v1/feedback", {"json": {"mask": ""}}, 422, "invalid-request"),
    (
        "feedback unknown id",
        "POST",
        "/v1/feedback",
        {"json": {"request_id": "nope", "mask": ""}},
        404,
        "request-not-found",
    ),
    (
        "feedback bad id in query",
        "POST",
        "/v1/feedback?request_id=a%20b",
        {"json": {"mask": ""}},
        422,
        "invalid-request",
    ),
    ("unknown problem type", "GET", "/problems/nope", {}, 404, "not-found"),
    ("unknown path", "GET", "/v2/nothing", {}, 404, "not-found"),
    ("wrong method", "GET", "/v1/segment", {}, 405, "method-not-allowed"),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "kwargs", "status", "slug"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_bad_input_is_a_problem_naming_it(
    client: TestClient, name: str, method: str, path: str, kwargs: dict[str, Any], status: int, slug: str
) -> None:
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status and body["detail"], body
    assert body.get("request_id") == response.headers["x-request-id"] or status in (404, 405)


def test_feedback_with_a_bad_mask_names_it(client: TestClient) -> None:
    served = client.post("/v1/segment", content=GOOD, headers=PNG)
    request_id = served.headers["x-request-id"]
    for mask, expected in (
        (b"not a png", "expected a PNG image of class ids"),
        (png_bytes(scene(8, 8)), "expected 32 x 24 pixels"),
    ):
        answer = client.post(
            "/v1/feedback", json={"request_id": request_id, "mask": base64.b64encode(mask).decode()}
        )
        assert answer.status_code == 422 and answer.json()["type"] == "/problems/invalid-mask"
        assert expected in answer.json()["detail"], answer.json()
