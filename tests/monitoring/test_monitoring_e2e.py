"""End to end: `blda serve --workers 2` and a real Prometheus on 127.0.0.1, evaluating the shipped rules.

Images and feedback go to the server; the test computes the same per-class figures from its own logits
(the bundle's arithmetic is exact, see monitoring_helpers) and polls Prometheus until every recording
rule returns them. On CI (CI=true) a missing prometheus binary fails the test instead of skipping it.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from monitoring_helpers import (
    CLASS_NAMES,
    MODEL,
    VERSION,
    Expected,
    decode_png,
    model_weights,
    png,
    reference_logits,
    require_tool,
    scene,
)
from prometheus_client import CollectorRegistry, multiprocess

from calibration.bias import bias_from_confusion, iou_from_confusion
from calibration.tables import CalibrationTables
from service.telemetry import table_shares

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
DEADLINE_S = 120.0  # bounded; generous because CI machines may be loaded
C = len(CLASS_NAMES)
# (seed, (height, width), calibrate, feedback as): sides are multiples of the stride, sizes differ.
TRAFFIC = [
    (11, (64, 96), True, "multipart"),
    (12, (48, 64), True, "json"),
    (13, (32, 128), False, "multipart"),
    (14, (80, 48), True, None),
    (15, (40, 40), False, None),
    (16, (56, 72), True, "multipart"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own process group, stopped (then killed) with its children on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready at {url} after {DEADLINE_S} s:\n{log.read_text()[-3000:]}")


def query(prometheus: str, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
    response.raise_for_status()
    result = response.json()["data"]["result"]
    keep = ("class", "decision")
    return {
        tuple((k, v) for k, v in sorted(r["metric"].items()) if k in keep): float(r["value"][1])
        for r in result
    }


def serve_traffic(base: str, tables: CalibrationTables) -> Expected:
    weight, bias = model_weights()
    expected = Expected.empty(C)
    rng = np.random.default_rng(0)
    for seed, (height, width), calibrate, feedback in TRAFFIC:
        image = scene(height, width, seed)
        masks = expected.add_request(reference_logits(image, weight, bias), tables, calibrate)
        # One client per image: a new connection, which either worker may accept; the feedback may reach
        # either worker too (they share the state `blda serve` creates).
        with httpx.Client(base_url=base, timeout=30) as client:
            response = client.post(
                f"/v1/models/{MODEL}/segment",
                params={"calibrate": str(calibrate).lower()},
                content=png(image),
                headers={"content-type": "image/png"},
            )
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(decode_png(response.content), masks[-1])
            if feedback is None:
                continue
            truth = np.where(rng.random(masks[0].shape) < 0.25, rng.integers(0, C, masks[0].shape), masks[0])
            truth = truth.astype(np.uint8)
            truth[: height // 8] = 255
            request_id = response.headers["x-request-id"]
            deadline = time.monotonic() + 10
            while True:  # the prediction is stored by an observer that runs after the response
                if feedback == "json":
                    body = {"request_id": request_id, "mask": base64.b64encode(png(truth)).decode()}
                    answer = client.post("/v1/feedback", json=body)
                else:
                    files = {"mask": ("truth.png", png(truth), "image/png")}
                    answer = client.post("/v1/feedback", data={"request_id": request_id}, files=files)
                if answer.status_code != 404 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert answer.status_code == 200, answer.text
            expected.add_feedback(masks, truth)
    return expected


def expected_rules(expected: Expected) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    def key(**labels: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(labels.items()))

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    share, mean_u, mean_a, iou, bias = {}, {}, {}, {}, {}
    for d, decision in enumerate(("raw", "calibrated")):
        conf = expected.confusion[d]
        ious, biases = iou_from_confusion(conf), bias_from_confusion(conf)
        for c, name in enumerate(CLASS_NAMES):
            k = key(**{"class": name, "decision": decision})
            n = expected.pixels[d, c]
            share[k] = n / expected.pixels[d].sum()
            if n:
                mean_u[k] = expected.u_sum[d, c] / n - 0.5
                mean_a[k] = expected.a_sum[d, c] / n - 0.5
            if np.isfinite(ious[c]):
                iou[k] = ious[c]
            bias[k] = biases[c]
    out["model_version_class_decision:blda_predicted_pixels:share_rate5m"] = share
    out["model_version_class_decision:blda_positive_quantile:mean_minus_half_rate5m"] = mean_u
    out["model_version_class_decision:blda_anchor_quantile:mean_minus_half_rate5m"] = mean_a
    out["model_version_decision_class:blda_feedback_iou:increase1h"] = iou
    out["model_version_decision_class:blda_feedback_bias:increase1h"] = bias
    out["model_version:blda_calibration_flipped_pixels:ratio_rate5m"] = {
        (): expected.flipped[0].sum() / expected.calibration_input.sum()
    }
    out["model_version_class:blda_calibration_flip_out:ratio_rate5m"] = {
        key(**{"class": name}): expected.flipped[0, c] / expected.calibration_input[c]
        for c, name in enumerate(CLASS_NAMES)
        if expected.calibration_input[c]
    }
    out["model_version_class:blda_calibration_flip_in:ratio_rate5m"] = {
        key(**{"class": name}): expected.flipped[1, c] / expected.pixels[1, c]
        for c, name in enumerate(CLASS_NAMES)
        if expected.pixels[1, c]
    }
    return out


def mismatches(prometheus: str, wanted: dict[str, dict[Any, float]]) -> list[str]:
    problems = []
    for rule, values in wanted.items():
        got = query(prometheus, f'{rule}{{model="{MODEL}", version="{VERSION}"}}')
        if got.keys() != values.keys():
            problems.append(f"{rule}: series {sorted(got)} != expected {sorted(values)}")
            continue
        for labels, value in values.items():
            # Quantiles: tabulated CDFs in the service, exact mixtures here (~1e-5 apart per pixel).
            rtol, atol = (1e-4, 1e-5) if "quantile" in rule else (1e-6, 1e-9)
            if not np.isclose(got[labels], value, rtol=rtol, atol=atol):
                problems.append(f"{rule}{dict(labels)}: got {got[labels]}, expected {value}")
    return problems


def live_counter_files(directory: Path) -> list[Path]:
    """The ``counter_<pid>.db`` files of processes that are alive."""
    live = []
    for path in directory.glob("counter_*.db"):
        try:
            os.kill(int(path.stem.removeprefix("counter_")), 0)
        except (ProcessLookupError, ValueError):
            continue
        live.append(path)
    return live


def images_per_worker(directory: Path) -> dict[str, float]:
    """Diagnostics: each worker's own count, read from its file alone."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        alone = directory / f"only_{path.stem}"
        alone.mkdir()
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        counts[path.stem] = sum(
            s.value for m in registry.collect() for s in m.samples if s.name == "blda_segmented_images_total"
        )
    return counts


@dataclass
class Stack:
    base: str  # the service
    prometheus: str
    multiproc: Path


def alertmanager_tool() -> str:
    # Upstream names the binary alertmanager, Debian's package prometheus-alertmanager.
    return shutil.which("alertmanager") or require_tool("prometheus-alertmanager", "prometheus-alertmanager")


@contextmanager
def monitoring_stack(
    tmp_path: Path, models_dir: Path, rules: Path, alertmanager: Path | None = None
) -> Iterator[Stack]:
    """`blda serve --workers 2`, Prometheus evaluating the rule files in ``rules`` every second and, with
    ``alertmanager`` (a config file), an Alertmanager it sends its alerts to; all on 127.0.0.1."""
    prometheus_bin = require_tool("prometheus")
    port, prom_port, am_port = free_port(), free_port(), free_port()
    base, prometheus = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "BLDA_INTRA_OP_THREADS": "1",
        "BLDA_CPU_THREADS": "2",
        "BLDA_EXECUTION_PROVIDER": "cpu",  # exact float32 arithmetic (a GPU may round through TF32)
    }
    serve = [sys.executable, "-m", "blda", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
             "--models-dir", str(models_dir), "--log-level", "info", "--no-access-log"]  # fmt: skip
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules / "*.yml")],
        "scrape_configs": [{"job_name": "blda", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }
    if alertmanager is not None:
        targets = [{"targets": [f"127.0.0.1:{am_port}"]}]
        config["alerting"] = {"alertmanagers": [{"static_configs": targets}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]  # fmt: skip

    with ExitStack() as stack:
        if alertmanager is not None:
            # No cluster listener (it would bind every interface); debug level: the notifications' record.
            am = [alertmanager_tool(), f"--config.file={alertmanager}", f"--storage.path={tmp_path / 'am'}",
                  f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", "--log.level=debug"]  # fmt: skip
            am_p = stack.enter_context(running(am, tmp_path / "alertmanager.log"))
            wait_for(
                f"http://127.0.0.1:{am_port}/-/ready", am_p, tmp_path / "alertmanager.log", "alertmanager"
            )
        server = stack.enter_context(running(serve, tmp_path / "serve.log", env))
        prom_p = stack.enter_context(running(prom, tmp_path / "prometheus.log"))
        wait_for(f"{base}/readyz", server, tmp_path / "serve.log", "blda serve")
        wait_for(f"{prometheus}/-/ready", prom_p, tmp_path / "prometheus.log", "prometheus")
        # Both workers have started and written their series (at 0) to the multiprocess directory. A
        # worker uvicorn replaced (no health-check answer in time on a loaded machine) leaves its counter
        # file behind, summed as it should be: count the files of live workers.
        deadline = time.monotonic() + DEADLINE_S
        while len(live_counter_files(multiproc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        files = sorted(p.name for p in multiproc.iterdir())
        assert len(live_counter_files(multiproc)) == 2, (
            f"expected a counter file of each of the 2 live workers after {DEADLINE_S} s, got {files}; "
            f"serve log:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        )
        # A first scrape of the zero-initialised series, so that rate() counts the first requests too.
        while not query(prometheus, f'blda_predicted_pixels_total{{model="{MODEL}"}}'):
            assert time.monotonic() < deadline, "prometheus never scraped the service"
            time.sleep(0.2)
        yield Stack(base, prometheus, multiproc)


def test_prometheus_rules_match_the_served_traffic(
    tmp_path: Path, exact_models: tuple[Path, CalibrationTables]
) -> None:
    models_dir, tables = exact_models
    with monitoring_stack(tmp_path, models_dir, RULES_DIR) as stack:
        base, prometheus, multiproc = stack.base, stack.prometheus, stack.multiproc
        expected = serve_traffic(base, tables)
        assert expected.flipped.sum() > 0 and expected.confusion[1].sum() > 0
        wanted = expected_rules(expected)

        deadline = time.monotonic() + DEADLINE_S
        problems = mismatches(prometheus, wanted)
        while problems and time.monotonic() < deadline:
            time.sleep(0.5)
            problems = mismatches(prometheus, wanted)
        assert not problems, "\n".join(problems[:20])

        # The raw totals too: one scrape carries the sum over both workers.
        images = query(prometheus, f'sum(blda_segmented_images_total{{model="{MODEL}"}})')
        assert images == {(): float(len(TRAFFIC))}
        print(
            "images per worker:", images_per_worker(multiproc)
        )  # which worker got a connection is up to the kernel
        # Each worker's process figures: one series per pid, as many as workers.
        pids = httpx.get(f"{prometheus}/api/v1/query", params={"query": "blda_process_resident_memory_bytes"})
        series = pids.json()["data"]["result"]
        assert len({r["metric"]["pid"] for r in series}) == 2 and all(
            float(r["value"][1]) > 0 for r in series
        )
        scrape = httpx.get(f"{base}/metrics", timeout=10).text
        check = subprocess.run(
            [require_tool("promtool"), "check", "metrics"],
            input=scrape,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr


# Drifted traffic: flat images of one colour, which the exact bundle decides as one class everywhere.
FLAT_COLOURS = [
    (0, 0, 0),
    (255, 255, 255),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (128, 128, 128),
]
DRIFT_ALERT = "BLDAPredictedShareDrift"


def drift_alert_rules(directory: Path) -> float:
    """The shipped rules, with the drift alert's `for:` cut to 2 s (the shipped one is minutes); returns
    the shipped drift threshold."""
    directory.mkdir()
    shutil.copy(RULES_DIR / "blda.yml", directory / "blda.yml")
    alerts = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    threshold = None
    for group in alerts["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == DRIFT_ALERT:
                rule["for"] = "2s"
            if rule.get("record") == "blda:alert_threshold:predicted_share_drift":
                threshold = float(rule["expr"].strip().removeprefix("vector(").removesuffix(")"))
    assert threshold is not None
    (directory / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    return threshold


def alerts_firing(prometheus: str, name: str) -> dict[str, dict[str, Any]]:
    """Class -> the firing alert, from Prometheus's own alert state."""
    response = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5)
    response.raise_for_status()
    return {
        a["labels"]["class"]: a
        for a in response.json()["data"]["alerts"]
        if a["labels"]["alertname"] == name and a["state"] == "firing"
    }


def test_drifted_traffic_fires_the_drift_alert_through_alertmanager(
    tmp_path: Path, exact_models: tuple[Path, CalibrationTables]
) -> None:
    models_dir, tables = exact_models
    threshold = drift_alert_rules(tmp_path / "rules")
    # The shipped Alertmanager config, with a 1 s group_wait so that the first notification is logged now.
    am_config = yaml.safe_load((REPO / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    am_config["route"]["group_wait"] = "1s"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    weight, bias = model_weights()
    _, target_share = table_shares(tables)
    # The colour whose class the tables saw least: the strongest shift of the class mix.
    decided = {rgb: int(reference_logits(np.full((8, 8, 3), rgb, np.uint8), weight, bias)[:, 0, 0].argmax())
               for rgb in FLAT_COLOURS}  # fmt: skip
    colour = min(decided, key=lambda rgb: target_share[decided[rgb]])
    dominant = CLASS_NAMES[decided[colour]]
    # Every pixel is the dominant class now: its drift is 1 - its table share, the others' -their share.
    drift = {name: (1.0 if name == dominant else 0.0) - target_share[c] for c, name in enumerate(CLASS_NAMES)}
    expected = {name for name, d in drift.items() if abs(d) > threshold}
    assert dominant in expected and len(expected) < C, "expected a mix where some classes stay in bounds"

    with monitoring_stack(tmp_path, models_dir, tmp_path / "rules", tmp_path / "alertmanager.yml") as stack:
        # Without traffic there is no share, hence no drift to alert on.
        time.sleep(2)
        assert alerts_firing(stack.prometheus, DRIFT_ALERT) == {}
        image = png(np.full((64, 96, 3), colour, np.uint8))
        with httpx.Client(base_url=stack.base, timeout=30) as client:
            for _ in range(4):
                response = client.post(
                    f"/v1/models/{MODEL}/segment",
                    params={"calibrate": "false"},  # the served mask is the raw decision the alert watches
                    content=image,
                    headers={"content-type": "image/png"},
                )
                assert response.status_code == 200, response.text
                assert (decode_png(response.content) == decided[colour]).all()

        deadline = time.monotonic() + DEADLINE_S
        firing = alerts_firing(stack.prometheus, DRIFT_ALERT)
        while set(firing) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
            firing = alerts_firing(stack.prometheus, DRIFT_ALERT)
        assert set(firing) == expected, f"firing for {sorted(firing)}, expected {sorted(expected)}"
        alert = firing[dominant]
        assert alert["labels"]["model"] == MODEL and alert["labels"]["version"] == VERSION
        assert alert["labels"]["severity"] == "warning"
        assert np.isclose(float(alert["value"]), drift[dominant], atol=1e-9)
        assert alert["annotations"]["summary"].startswith(f"{MODEL}/{VERSION}: class {dominant} ")

        # Prometheus delivered it, and Alertmanager's default route logged the notification.
        am_log = tmp_path / "alertmanager.log"
        while time.monotonic() < deadline and not any(
            "msg=flushing" in line and DRIFT_ALERT in line for line in am_log.read_text().splitlines()
        ):
            time.sleep(0.5)
        flushed = [line for line in am_log.read_text().splitlines() if "msg=flushing" in line]
        assert any(DRIFT_ALERT in line and f'model=\\"{MODEL}\\"' in line for line in flushed), (
            am_log.read_text()[-3000:]
        )
