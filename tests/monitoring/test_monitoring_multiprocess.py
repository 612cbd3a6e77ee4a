"""prometheus_client's multiprocess mode: what two worker processes record, one scrape sums."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monitoring_helpers import CLASS_NAMES, fitted_tables, model_weights, random_record
from prometheus_client import CollectorRegistry, multiprocess

from service.cli import prepare_multiprocess_dir
from service.telemetry import QUANTILE_BUCKETS, BiasTotals, add_request, request_stats, tabulate_quantiles

HERE = Path(__file__).parent
REPO = HERE.parent.parent

# One "worker": the multiprocess directory is set before prometheus_client is imported, as `blda serve` does.
WORKER = """
import sys
sys.path[:0] = [{here!r}, {repo!r}]
from monitoring_helpers import CLASS_NAMES, fitted_tables, model_weights, random_record
from service.telemetry import Telemetry
tables = fitted_tables(*model_weights())
telemetry = Telemetry()
telemetry.register_version("m", "1", CLASS_NAMES, tables)
for seed in {seeds!r}:
    telemetry.observe_segmentation(random_record(tables, seed, calibrate=seed % 2 == 0))
telemetry.in_flight.inc()  # left at 1: this process exits without marking itself dead
print("ok")
"""


def run_worker(directory: Path, seeds: list[int]) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    code = WORKER.format(here=str(HERE), repo=str(REPO), seeds=seeds)
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip() == b"ok", err.decode()
    return process.pid


def collect(directory: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return registry


def test_a_scrape_sums_the_workers(tmp_path: Path) -> None:
    seeds = {"a": [0, 1, 2], "b": [3, 4]}
    pids = [run_worker(tmp_path, s) for s in seeds.values()]
    assert len({p.name.rsplit("_", 1)[-1] for p in tmp_path.glob("counter_*.db")}) == 2

    tables = fitted_tables(*model_weights())
    totals = BiasTotals(class_names=CLASS_NAMES)
    quantiles = tabulate_quantiles(tables)
    for seed in seeds["a"] + seeds["b"]:
        add_request(totals, request_stats(random_record(tables, seed, calibrate=seed % 2 == 0), quantiles))
    registry = collect(tmp_path)

    def get(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, {"model": "m", "version": "1", **labels})
        assert found is not None, (name, labels)
        return found

    for d, decision in enumerate(("raw", "calibrated")):
        for c, name in enumerate(CLASS_NAMES):
            labels = {"class": name, "decision": decision}
            assert get("blda_predicted_pixels_total", **labels) == totals.pixels[d, c]
            assert get("blda_positive_quantile_count", **labels) == totals.quantile_counts[d, c].sum()
            assert get("blda_positive_quantile_sum", **labels) == pytest.approx(totals.quantile_sums[d, c])
            cumulative = np.cumsum(totals.quantile_counts[d, c])
            for i, bound in enumerate(QUANTILE_BUCKETS):
                assert get("blda_positive_quantile_bucket", le=str(bound), **labels) == cumulative[i]
            assert get("blda_calibration_flipped_pixels_total", **labels) == totals.flipped[d, c]
    assert get("blda_segmented_images_total", calibrated="true") == 3  # seeds 0, 2, 4
    assert get("blda_segmented_images_total", calibrated="false") == 2
    # The model info gauge is one series (livemax over processes), not one per pid.
    assert get("blda_model_info", calibration="true") == 1

    # In-flight is a live sum: both exited processes still count until marked dead, as uvicorn's
    # workers do on shutdown (service.telemetry.stop_monitoring).
    assert registry.get_sample_value("blda_http_requests_in_flight") == 2
    multiprocess.mark_process_dead(pids[0], path=str(tmp_path))
    assert collect(tmp_path).get_sample_value("blda_http_requests_in_flight") == 1
    # Counters survive their process: they are totals.
    assert (
        collect(tmp_path).get_sample_value(
            "blda_segmented_images_total", {"model": "m", "version": "1", "calibrated": "true"}
        )
        == 3
    )


def test_serve_empties_a_preset_multiprocess_directory(tmp_path: Path) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("kept")
    environ = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    assert prepare_multiprocess_dir(2, environ) is None  # the operator's directory: not removed afterwards
    assert not list(tmp_path.glob("*.db")) and (tmp_path / "notes.txt").exists()
    missing = tmp_path / "new" / "dir"
    prepare_multiprocess_dir(2, {"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert missing.is_dir()
