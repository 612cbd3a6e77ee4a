"""The demo page in a real browser: headless Debian Chromium driven by Playwright for Python.

`blda serve` runs on 127.0.0.1 with the shipped bundle (models/). The page gets a generated street scene,
must draw both overlays, list the model's classes, show the changed-pixel count the JSON API gives for
the same image and tau, show the server's error for a non-image and for tau = 5, and never let a stale
reply overwrite a newer one (the older request is held back by a route intercept). Screenshots go to the
test's tmp dir and, on CI, to test-artifacts/ (ignored by git).

Skipped without chromium or playwright, except on CI (CI=true), where it fails: `.ci/run` installs
Debian's chromium, the dev extra installs playwright (never `playwright install`: it downloads a browser).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import REPO, free_port, start_server, stop, wait_ready

pytestmark = pytest.mark.e2e

MODEL = "blda-synth"
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # the shared 2-core machine: generous, but bounded


def missing(message: str) -> None:
    if ON_CI:
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        missing("chromium not found (Debian package 'chromium'; .ci/run installs it)")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not (REPO / "models" / MODEL).is_dir():
        missing(f"the shipped bundle models/{MODEL} is missing")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BLDA_DEFAULT_MODEL": MODEL, "BLDA_MAX_BODY_BYTES": str(20 * 1024 * 1024)}
    process = start_server(REPO / "models", port, env=env)
    try:
        wait_ready(process, base)
        yield base
    finally:
        stop(process)


def street_png(height: int, width: int, seed: int) -> bytes:
    from training.data.synth.config import SceneConfig, ShiftConfig, domain_configs
    from training.data.synth.scene import render_scene

    _, target = domain_configs(ShiftConfig())
    rgb, _ = render_scene(np.random.default_rng(seed), SceneConfig(height=height, width=width), target)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def api(base: str, data: bytes, tau: float) -> dict[str, Any]:
    response = httpx.post(
        f"{base}/v1/models/{MODEL}/segment",
        params={"format": "json", "calibrate": "true", "tau": str(tau)},
        content=data,
        headers={"content-type": "image/png"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def shots_dir(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / "screenshots"]
    if ON_CI:
        dirs.append(REPO / "test-artifacts" / "browser")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def test_demo_page_in_chromium(server: str, tmp_path: Path) -> None:
    executable = chromium_path()
    try:
        from playwright.sync_api import Route, sync_playwright
    except ImportError:
        missing("playwright not installed (the dev extra: pip install -e '.[dev]')")
        raise
    image = tmp_path / "street.png"
    data = street_png(256, 512, seed=21)
    image.write_bytes(data)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    info = httpx.get(f"{server}/v1/models/{MODEL}", timeout=10).json()
    classes = [c["name"] for c in info["classes"]]
    active = next(v for v in info["versions"] if v["active"])["calibration"]
    dirs = shots_dir(tmp_path)

    def shot(page: Any, name: str) -> None:
        for d in dirs:
            page.screenshot(path=str(d / f"{name}.png"), full_page=True)

    held: list[Route] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(server)
            page.wait_for_selector("body[data-ready='true']")
            legend = page.locator("#legend .cls").evaluate_all("rows => rows.map(r => r.dataset.class)")
            assert legend == classes
            # The calibrator select offers the active version's calibrators and starts on its default
            # (one that calibrates), so the page compares two decisions.
            options = page.locator("#calibrator option").evaluate_all("os => os.map(o => o.value)")
            assert options == active["calibrators"] and len(options) > 2
            assert page.locator("#calibrator").input_value() == active["default_calibrator"] == "blda"

            # Both overlays drawn, at the image's size; the changed-pixel count is the API's.
            page.set_input_files("#file", str(image))
            page.wait_for_selector("body[data-state='done']")
            shot(page, "1-segmented")
            sizes = page.evaluate(
                "['view-raw', 'view-cal', 'view-changed'].map(id => [document.getElementById(id).width,"
                " document.getElementById(id).height])"
            )
            assert sizes == [[512, 256]] * 3
            expected = api(server, data, 0.2)
            assert expected["changed_pixels"] > 0, "the image must exercise calibration"
            assert page.get_attribute("#changed-count", "data-value") == str(expected["changed_pixels"])
            # The overlays differ where calibration changed pixels: the page drew two different masks.
            differ = page.evaluate(
                """() => {
                  const px = (id) => document.getElementById(id).getContext('2d')
                    .getImageData(0, 0, 512, 256).data;
                  const a = px('view-raw'), b = px('view-cal');
                  let n = 0; for (let i = 0; i < a.length; i += 4) if (a[i] !== b[i] || a[i+1] !== b[i+1]) n++;
                  return n;
                }"""
            )
            assert differ > 0

            # A stale reply must not overwrite a newer one: hold the tau = 0.2 request back, ask for 0.5.
            page.route("**/segment?*tau=0.2*", lambda route: held.append(route))
            page.evaluate("document.body.dataset.state = 'idle'")
            page.locator("#tau").fill("0.2")
            page.locator("#tau").dispatch_event("change")
            deadline = time.monotonic() + 10
            while not held and time.monotonic() < deadline:
                page.wait_for_timeout(50)
            assert held, "the tau = 0.2 request did not reach the intercept"
            page.locator("#tau").fill("0.5")
            page.locator("#tau").dispatch_event("change")
            page.wait_for_selector("#summary[data-tau='0.5']")
            page.wait_for_selector("body[data-state='done']")
            for route in held:  # the old answer arrives now, after the new one
                # The page may have aborted it (AbortController): then there is nothing to continue.
                with contextlib.suppress(Exception):
                    route.continue_()
            page.wait_for_timeout(1500)
            assert page.get_attribute("#summary", "data-tau") == "0.5"
            newer = api(server, data, 0.5)
            assert page.get_attribute("#changed-count", "data-value") == str(newer["changed_pixels"])
            page.unroute("**/segment?*tau=0.2*")
            shot(page, "2-newer-reply-kept")

            # The server's errors, shown as the server words them: tau out of range, then a non-image.
            page.locator("#tau").fill("5")
            page.locator("#tau").dispatch_event("change")
            page.wait_for_selector("#status.error")
            problem = httpx.post(
                f"{server}/v1/models/{MODEL}/segment",
                params={"format": "json", "calibrate": "true", "tau": "5"},
                content=data,
                headers={"content-type": "image/png"},
                timeout=60,
            ).json()
            assert problem["status"] == 422
            assert problem["detail"] in page.inner_text("#status")
            shot(page, "3-tau-error")
            page.locator("#tau").fill("0.2")
            page.evaluate("document.getElementById('status').className = ''")
            page.set_input_files("#file", str(text))
            page.wait_for_selector("#status.error")
            refused = httpx.post(
                f"{server}/v1/models/{MODEL}/segment",
                params={"format": "json", "calibrate": "true", "tau": "0.2"},
                files={"file": ("notes.txt", b"not an image", "text/plain")},
                timeout=60,
            ).json()
            assert refused["status"] in (415, 422)
            assert refused["detail"] in page.inner_text("#status")
            shot(page, "4-not-an-image")

            # A 1024 x 2048 image: answered and drawn without freezing the page (frames keep coming).
            big = tmp_path / "big.png"
            big_data = street_png(1024, 2048, seed=22)
            big.write_bytes(big_data)
            page.evaluate(
                """() => { window.gaps = []; let last = performance.now();
                  const tick = (t) => { window.gaps.push(t - last); last = t; requestAnimationFrame(tick); };
                  requestAnimationFrame(tick); document.body.dataset.state = 'idle'; }"""
            )
            page.set_input_files("#file", str(big))
            page.wait_for_selector("body[data-state='done']")
            page.wait_for_timeout(200)
            assert page.evaluate("document.getElementById('view-cal').width") == 2048
            assert page.get_attribute("#changed-count", "data-value") == str(
                api(server, big_data, 0.2)["changed_pixels"]
            )
            longest = page.evaluate("Math.max(...window.gaps)")
            assert longest < 1500, f"the page froze for {longest:.0f} ms"  # ~130 ms measured on 2 busy cores
            shot(page, "5-1024x2048")

            # The live view: the per-class figures of the traffic just sent.
            page.click("#tab-live")
            page.wait_for_function("document.querySelectorAll('#live-table tbody tr').length > 0")
            first = page.locator("#live-table tbody tr").first.inner_text()
            assert classes[0] in first
            shot(page, "6-live-figures")
        finally:
            context.close()
