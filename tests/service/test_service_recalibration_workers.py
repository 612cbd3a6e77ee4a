"""Live recalibration through `blda serve --workers 2`: both workers' traffic reaches the refit, the
candidate is loaded and shadowed by every worker, activate and rollback reach both, a restart keeps it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from server_helpers import free_port, start_server, stop, wait_ready
from service_helpers import ADMIN_KEY, png_bytes, scene

from calibration.traffic import decode_sample

pytestmark = pytest.mark.e2e

PNG = {"content-type": "image/png", "Connection": "close"}  # a fresh connection: either worker takes it
ADMIN = {"X-API-Key": ADMIN_KEY}
ENV = {"BLDA_RECALIBRATION_PIXELS_PER_REQUEST": "2000", "BLDA_RECALIBRATION_CHUNK_PIXELS": "100000"}


def _segment(base: str, seed: int) -> httpx.Response:
    answer = httpx.post(
        f"{base}/v1/models/tiny/segment", content=png_bytes(scene(48, 64, seed)), headers=PNG, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer


def _traffic_pixels(base: str) -> int:
    answer = httpx.get(f"{base}/v1/models/tiny/traffic", headers=ADMIN, timeout=60)
    return decode_sample(answer.content).num_pixels


def test_two_workers_share_traffic_and_follow_activate_and_rollback_across_a_restart(
    own_models_dir: Path,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(own_models_dir, port, workers=2, env=ENV)
    try:
        wait_ready(process, base, timeout_s=120)
        for seed in range(16):
            _segment(base, seed)
        # Each worker's own telemetry: both served some of the requests.
        served: dict[int, bool] = {}
        for _ in range(20):
            report = httpx.get(f"{base}/v1/models/tiny/bias", headers=PNG, timeout=30).json()
            served[report["process_id"]] = report["versions"]["2"]["images"] > 0
        assert len(served) == 2 and all(served.values()), served
        # Buffers hold < chunk_pixels here: only each worker's periodic flush (every 1 s) writes them, and
        # the recalibrate call (on one worker) must see the other's pixels too.
        time.sleep(4.0)
        with httpx.Client(base_url=base, timeout=120, headers=ADMIN) as admin:
            answer = admin.post("/v1/models/tiny/recalibrate", params={"min_pixels": 1000})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["candidate_version"] == "3" and body["active_version"] == "2"
            assert body["sync"]["workers_switched"] == 2, body["sync"]
            assert body["recalibration"]["requests"] == 16
            assert body["recalibration"]["pixels"] == _traffic_pixels(base) == 16 * 2000
            assert {_segment(base, s).headers["x-model-version"] for s in range(6)} == {"2"}
            for version, call in (
                ("3", "/v1/models/tiny/versions/3/activate"),
                ("2", "/v1/models/tiny/rollback"),
            ):
                answer = admin.post(call)
                assert answer.status_code == 200 and answer.json()["sync"]["all_switched"], answer.text
                assert {_segment(base, s).headers["x-model-version"] for s in range(6)} == {version}
    finally:
        stop(process)
    # A fresh SQLite state (no pins): serving.json holds, though 3 is the highest version.
    process = start_server(own_models_dir, port, workers=2, env=ENV)
    try:
        wait_ready(process, base, timeout_s=120)
        assert {_segment(base, s).headers["x-model-version"] for s in range(6)} == {"2"}
    finally:
        stop(process)
