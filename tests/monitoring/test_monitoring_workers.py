"""Per-worker process metrics and model-version status (service.worker_metrics), one process and two."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi.testclient import TestClient
from monitoring_helpers import wait_until
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from service.worker_metrics import WorkerMetrics

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PROCESS_METRICS = ("blda_process_cpu_seconds", "blda_process_resident_memory_bytes", "blda_process_open_fds")

# One "worker" in multiprocess mode: burns some CPU, holds some memory, opens files, samples itself.
WORKER = """
import sys, time
sys.path[:0] = [{repo!r}]
from prometheus_client import CollectorRegistry
from service.worker_metrics import WorkerMetrics
ballast = bytearray(64 * 2**20)  # 64 MiB, touched: resident
ballast[::4096] = b"x" * len(ballast[::4096])
handles = [open({path!r}) for _ in range(20)]
end = time.process_time() + 0.2
while time.process_time() < end:
    pass
WorkerMetrics(CollectorRegistry()).sample()
print("ok")
"""


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_single_process_reports_its_own_figures_and_version_status(client: TestClient) -> None:
    samples = scrape(client)
    assert samples[("blda_process_cpu_seconds", ())] > 0
    assert samples[("blda_process_resident_memory_bytes", ())] > 10 * 2**20  # numpy, onnxruntime loaded
    assert samples[("blda_process_open_fds", ())] >= 3
    status = {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "blda_model_version_status"
    }
    assert status == {"ready": 1, "stale": 0, "failed": 0}


def _version(version: str, status: str) -> SimpleNamespace:
    return SimpleNamespace(version=version, status=status)


def test_version_status_follows_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    versions = {"1": _version("1", "ready"), "2": _version("2", "stale"), "3": _version("3", "failed")}
    models: Any = SimpleNamespace(models=lambda: [SimpleNamespace(name="m", versions=versions)])
    metrics.record_versions(models)

    def status(version: str) -> dict[str, float | None]:
        return {
            s: registry.get_sample_value(
                "blda_model_version_status", {"model": "m", "version": version, "status": s}
            )
            for s in ("ready", "stale", "failed")
        }

    assert status("1") == {"ready": 1, "stale": 0, "failed": 0}
    assert status("2") == {"ready": 0, "stale": 1, "failed": 0}
    assert status("3") == {"ready": 0, "stale": 0, "failed": 1}
    del versions["2"]  # its directory was removed: no status left at 1
    versions["1"] = _version("1", "stale")
    metrics.record_versions(models)
    assert status("2") == {"ready": 0, "stale": 0, "failed": 0}
    assert status("1") == {"ready": 0, "stale": 1, "failed": 0}


def test_each_worker_reports_its_own_process_figures(tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    code = WORKER.format(repo=str(REPO), path=str(HERE / "conftest.py"))
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
        assert run.returncode == 0 and run.stdout.strip() == b"ok", run.stderr.decode()
    pids = sorted({p.stem.rsplit("_", 1)[-1] for p in directory.glob("gauge_liveall_*.db")})
    assert len(pids) == 2

    def collect() -> dict[str, dict[str, float]]:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))
        out: dict[str, dict[str, float]] = {name: {} for name in PROCESS_METRICS}
        for family in registry.collect():
            for s in family.samples:
                if s.name in out:
                    out[s.name][s.labels["pid"]] = s.value
        return out

    figures = collect()
    for name in PROCESS_METRICS:
        assert sorted(figures[name]) == pids, name  # one series per worker, not a sum or a max
    for pid in pids:
        assert figures["blda_process_cpu_seconds"][pid] >= 0.2
        assert figures["blda_process_resident_memory_bytes"][pid] >= 64 * 2**20
        assert figures["blda_process_open_fds"][pid] >= 20
    multiprocess.mark_process_dead(int(pids[0]), path=str(directory))  # as stop_monitoring does
    assert all(sorted(v) == pids[1:] for v in collect().values())


def test_the_timer_picks_up_a_reload_and_stops() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, interval_s=0.02)
    versions = {"1": _version("1", "ready")}
    models: Any = SimpleNamespace(models=lambda: [SimpleNamespace(name="m", versions=versions)])
    labels = {"model": "m", "version": "1", "status": "stale"}
    metrics.start(models)
    try:
        assert registry.get_sample_value("blda_model_version_status", labels) == 0
        versions["1"] = _version("1", "stale")  # a reload in this worker failed
        wait_until(lambda: registry.get_sample_value("blda_model_version_status", labels) == 1, 5.0, "a tick")
    finally:
        metrics.stop()
    assert metrics._thread is None
