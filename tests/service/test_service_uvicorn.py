"""The real thing: `blda serve` (uvicorn) on 127.0.0.1, posted to with httpx."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import MAX_BODY, REPO, free_port, start_server, stop, wait_ready
from service_helpers import png_bytes, scene


@pytest.fixture
def server(models_dir: Path) -> Iterator[str]:
    port = free_port()
    process = start_server(models_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        yield base
    finally:
        stop(process)


@pytest.mark.e2e
def test_real_server_segments_an_uploaded_image(server: str) -> None:
    rgb = scene(75, 110, seed=11)
    with httpx.Client(base_url=server, timeout=30.0) as http:
        response = http.post("/v1/segment", files={"file": ("street.png", png_bytes(rgb), "image/png")})
        assert response.status_code == 200, response.text
        mask = np.asarray(Image.open(io.BytesIO(response.content)))
        assert mask.shape == (75, 110) and mask.max() < 19
        assert response.headers["x-model-version"] == "2" and response.headers["x-calibrated"] == "true"
        assert "infer;dur=" in response.headers["server-timing"]
        raw = http.post(
            "/v1/segment?calibrate=false", content=png_bytes(rgb), headers={"content-type": "image/png"}
        )
        assert raw.status_code == 200 and raw.headers["x-calibrated"] == "false"
        bad = http.post(
            "/v1/segment", content=b"\x89PNG\r\n\x1a\nbroken", headers={"content-type": "image/png"}
        )
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
        too_big = png_bytes(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
        assert len(too_big) > MAX_BODY
        for request in (
            {"content": too_big, "headers": {"content-type": "image/png"}},
            {"files": {"file": ("big.png", too_big, "image/png")}},
        ):
            response = http.post("/v1/segment", **request)
            assert response.status_code == 413 and response.json()["type"] == "/problems/payload-too-large"
        assert http.post(
            "/v1/segment", content=png_bytes(rgb), headers={"content-type": "image/png"}
        ).is_success
        assert http.get("/docs").status_code == 200
        assert http.get("/healthz").json() == {"status": "ok"}


@pytest.mark.e2e
@pytest.mark.slow
def test_real_server_with_two_workers(models_dir: Path) -> None:
    port = free_port()
    process = start_server(models_dir, port, workers=2)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, timeout_s=120)
        with httpx.Client(base_url=base, timeout=30.0) as http:
            for _ in range(6):
                data = png_bytes(scene(40, 40))
                response = http.post("/v1/segment", content=data, headers={"content-type": "image/png"})
                assert response.status_code == 200
    finally:
        stop(process)


def test_serve_rejects_a_missing_models_dir(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blda", "serve", "--models-dir", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --models-dir: expected a directory")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "error: --settings-file: expected an existing file"),
        ("workers = = 1", "error: "),
        ('max_image_pixels = "many"', "error: setting max_image_pixels: "),
    ],
)
def test_serve_rejects_bad_settings_in_one_line(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "service.toml"
    if content is not None:
        path.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "blda", "serve", "--settings-file", str(path), "--models-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


@pytest.mark.e2e
def test_json_logs_have_one_line_per_request_with_its_id(models_dir: Path) -> None:
    port = free_port()
    process = start_server(models_dir, port, env={"BLDA_LOG_FORMAT": "json"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        with httpx.Client(base_url=base, timeout=30.0) as http:
            served = http.post(
                "/v1/segment",
                content=png_bytes(scene(24, 24)),
                headers={"content-type": "image/png", "X-Request-Id": "mine"},
            )
            refused = http.post("/v1/segment", content=b"junk", headers={"content-type": "image/png"})
    finally:
        output = stop(process)
    assert served.status_code == 200 and refused.status_code == 422
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    by_id = {line.get("request_id"): line for line in lines if line["logger"] == "blda.access"}
    line = by_id[served.headers["x-request-id"]]
    assert line["client_request_id"] == "mine" and line["route"] == "/v1/segment" and line["status"] == 200
    assert line["model"] == "tiny" and line["version"] == "2" and line["duration_ms"] > 0
    assert set(line["stages_ms"]) == {"decode", "infer", "calibrate", "encode"}
    assert by_id[refused.headers["x-request-id"]]["status"] == 422


def bad_multiproc_dirs(tmp_path: Path) -> list[tuple[str, Path]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = [
        ("a regular file", a_file),
        ("below a regular file", a_file / "sub"),
        ("in /proc", Path("/proc/blda-x")),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(("unwritable", locked))
    else:
        cases.append(("unwritable", Path("/proc/self")))
    return cases


@pytest.mark.parametrize("case", ["a regular file", "below a regular file", "in /proc", "unwritable"])
def test_serve_rejects_a_bad_multiprocess_dir_in_one_line(
    tmp_path: Path, models_dir: Path, case: str
) -> None:
    path = dict(bad_multiproc_dirs(tmp_path))[case]
    result = subprocess.run(
        [sys.executable, "-m", "blda", "serve", "--workers", "2", "--models-dir", str(models_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: PROMETHEUS_MULTIPROC_DIR: expected a"), (
        result.stderr
    )
    assert "Traceback" not in result.stderr
