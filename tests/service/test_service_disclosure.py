"""Unauthenticated answers never carry the server's absolute paths or object reprs (heap addresses)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import BundleFactory, png_bytes, scene, settings_for

from service.app import create_app
from service.problems import redact

PNG = {"content-type": "image/png"}
HEAP = re.compile(r"0x[0-9a-fA-F]{6,}")


def leaks(text: str, root: Path) -> list[str]:
    found = [str(root)] if str(root) in text or str(root.resolve()) in text else []
    return found + HEAP.findall(text)


def test_load_errors_and_not_ready_answers_hide_paths(tmp_path: Path, make_bundle: BundleFactory) -> None:
    models = tmp_path / "models"
    bundle = make_bundle(models, "tiny", "1")
    (bundle / "model.onnx").write_bytes(b"junk")  # fails its checksum: the error names the file
    with TestClient(create_app(settings_for(models))) as client:
        answers = [
            client.get("/v1/models"),
            client.get("/v1/models/tiny"),
            client.get("/readyz"),
            client.post("/v1/segment", content=png_bytes(scene(16, 16)), headers=PNG),
            client.post("/v1/models/tiny/segment", content=png_bytes(scene(16, 16)), headers=PNG),
        ]
        error = client.get("/v1/models").json()[0]["versions"][0]["error"]
    assert error.startswith("tiny/1/model.onnx: sha256: expected"), error  # relative, still useful
    for answer in answers:
        assert not leaks(answer.text, tmp_path), (answer.request.url, answer.text)
    assert answers[2].status_code == 503 and answers[3].status_code == 503


def test_empty_models_dir_is_not_named(tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tmp_path, default_model=None))) as client:
        for answer in (client.get("/readyz"), client.post("/v1/segment", content=b"x", headers=PNG)):
            assert answer.status_code == 503 and not leaks(answer.text, tmp_path), answer.text


@pytest.mark.parametrize(
    "body",
    [
        {"mask": base64.b64encode(b"not a png at all").decode()},
        {"mask": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()},
        {"mask": {"nested": [1, 2]}},
        {"request_id": {"an": "object"}, "mask": ""},
    ],
)
def test_feedback_errors_carry_no_object_reprs(client: TestClient, body: dict[str, object]) -> None:
    served = client.post("/v1/segment", content=png_bytes(scene(16, 16)), headers=PNG)
    body = {"request_id": served.headers["x-request-id"], **body}
    answer = client.post("/v1/feedback", json=body)
    assert 400 <= answer.status_code < 500, answer.text
    assert not HEAP.search(answer.text) and " object at " not in answer.text, answer.text


def test_segment_errors_carry_no_object_reprs(client: TestClient) -> None:
    for data in (b"junk", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"RIFF\0\0\0\0WEBPVP8 "):
        answer = client.post("/v1/segment", content=data, headers=PNG)
        assert answer.status_code == 422 and not HEAP.search(answer.text), answer.text


def test_redact() -> None:
    assert redact("/srv/models/tiny/1/model.onnx: bad", "/srv/models") == "tiny/1/model.onnx: bad"
    assert redact("read /etc/blda/secret.toml") == "read .../secret.toml"
    assert redact("got <_io.BytesIO object at 0x7f00aa11>") == "got BytesIO"
    assert redact("see /v1/models/tiny and /problems/not-found, 3/4 done") == (
        "see /v1/models/tiny and /problems/not-found, 3/4 done"
    )
