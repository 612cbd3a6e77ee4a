"""Admin changes reach every worker: `blda serve --workers 2` under light load, then reload and activate."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import free_port, start_server, stop, wait_ready
from service_helpers import ADMIN_KEY, BundleFactory, png_bytes, scene

pytestmark = pytest.mark.e2e

PNG = {"content-type": "image/png", "Connection": "close"}
ADMIN = {"X-API-Key": ADMIN_KEY}
IMAGE = png_bytes(scene(24, 32, seed=4))


def served_version(base: str, model: str = "tiny") -> str:
    # A fresh connection per request: either worker may take it.
    response = httpx.post(
        f"{base}/v1/models/{model}/segment?calibrate=false", content=IMAGE, headers=PNG, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"]


def test_every_worker_serves_what_the_admin_answer_reports(
    own_models_dir: Path, make_bundle: BundleFactory
) -> None:
    make_bundle(own_models_dir, "tiny", "3", seed=6)  # three versions: the one before and after differ
    port = free_port()
    process = start_server(own_models_dir, port, workers=2)
    base = f"http://127.0.0.1:{port}"
    log: list[tuple[float, str]] = []  # (when the request started, the version that served it)
    stop_load = threading.Event()

    def load() -> None:
        while not stop_load.is_set():
            started = time.monotonic()
            log.append((started, served_version(base)))

    try:
        wait_ready(process, base, timeout_s=120)
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        # (when the admin call was sent, when its answer arrived, the version it activated)
        switches: list[tuple[float, float, str]] = []
        with httpx.Client(base_url=base, timeout=60.0) as admin:
            for version in ("1", "2", "3", "1"):  # 3 serves at start
                sent = time.monotonic()
                answer = admin.post(f"/v1/models/tiny/versions/{version}/activate", headers=ADMIN)
                switches.append((sent, time.monotonic(), version))
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["active_version"] == version
                assert body["sync"]["all_switched"] and body["sync"]["workers_switched"] == 2, body["sync"]
                assert [served_version(base) for _ in range(6)] == [version] * 6
                time.sleep(0.5)
        stop_load.set()
        loader.join(timeout=30)
        # No request that started after an answer was served by the version before it. (One that started
        # just before the next call was sent may be served by the next version: that is no staleness.)
        stale = []
        before = "3"
        for i, (_, answered, version) in enumerate(switches):
            next_sent = switches[i + 1][0] if i + 1 < len(switches) else float("inf")
            stale += [(i, v) for started, v in log if answered <= started < next_sent and v == before]
            before = version
        assert len(log) > 10 and not stale, stale

        # A reload reaches every worker too: a new version of `plain` on disk.
        make_bundle(own_models_dir, "plain", "2", seed=5, calibrated=False)
        with httpx.Client(base_url=base, timeout=60.0) as admin:
            answer = admin.post("/v1/models/plain/reload", headers=ADMIN)
        assert answer.status_code == 200 and answer.json()["sync"]["all_switched"], answer.text
        assert [served_version(base, "plain") for _ in range(8)] == ["2"] * 8
        # And every worker's /readyz agrees.
        reports = {
            str(httpx.get(f"{base}/readyz", headers={"Connection": "close"}).json()["active_versions"])
            for _ in range(8)
        }
        assert len(reports) == 1, reports
    finally:
        stop_load.set()
        stop(process)
