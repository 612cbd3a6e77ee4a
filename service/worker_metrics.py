"""Per-worker process figures (CPU seconds, resident memory, open file descriptors) and model-version status.

prometheus_client's ``ProcessCollector`` reports the process that answers the scrape, and in multiprocess
mode it is not part of the registry built per scrape at all: with several uvicorn workers nothing said
how much CPU or memory each one used. So every worker samples *itself* on a timer (the same ``/proc``
reading, through ``ProcessCollector``) into gauges of mode ``liveall``: one series per live worker,
labelled ``pid`` by the multiprocess collector, dropped when the worker is marked dead. In single-process
mode the same gauges carry no ``pid`` label.

The same timer records each model version's registry status (``ready``/``stale``/``failed``): a reload
changes the registry of the one worker that handled it, so every worker must report its own, and the
scrape may always reach the same worker (keep-alive). ``livemax`` over workers: 1 if any live worker sees
the version in that status.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

if TYPE_CHECKING:
    from service.registry import ModelRegistry

STATUSES = ("ready", "stale", "failed")
SAMPLE_INTERVAL_S = 5.0


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        # Cumulative CPU time as a gauge: a per-process counter would outlive its worker in multiprocess
        # mode (counter files are summed, live or dead); rate() reads it like a counter.
        self.cpu_seconds = Gauge(
            "blda_process_cpu_seconds", "User and system CPU time of this worker process (cumulative).",
            multiprocess_mode="liveall", registry=registry,
        )  # fmt: skip
        self.resident_memory = Gauge(
            "blda_process_resident_memory_bytes", "Resident memory of this worker process.",
            multiprocess_mode="liveall", registry=registry,
        )  # fmt: skip
        self.open_fds = Gauge(
            "blda_process_open_fds", "Open file descriptors of this worker process.",
            multiprocess_mode="liveall", registry=registry,
        )  # fmt: skip
        self.version_status = Gauge(
            "blda_model_version_status",
            "1 for the registry status of each model version (ready, stale: a reload failed and the "
            "previous copy serves, failed: never loaded), max over live workers.",
            ["model", "version", "status"], multiprocess_mode="livemax", registry=registry,
        )  # fmt: skip
        self._process = ProcessCollector(registry=None)  # not registered: read by sample() only
        self._versions: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Read this process's /proc figures into the gauges (no-op where /proc is missing)."""
        targets = {
            "process_cpu_seconds_total": self.cpu_seconds,
            "process_resident_memory_bytes": self.resident_memory,
            "process_open_fds": self.open_fds,
        }
        for family in self._process.collect():
            for sample in family.samples:
                gauge = targets.get(sample.name)
                if gauge is not None:
                    gauge.set(sample.value)

    def record_versions(self, models: ModelRegistry) -> None:
        seen = set()
        for state in models.models():
            for version in state.versions.values():
                seen.add((state.name, version.version))
                for status in STATUSES:
                    self.version_status.labels(state.name, version.version, status).set(
                        1 if version.status == status else 0
                    )
        # A version whose directory was removed: 0 everywhere rather than remove(), which in multiprocess
        # mode would leave its last value in this worker's file.
        for model, gone in self._versions - seen:
            for status in STATUSES:
                self.version_status.labels(model, gone, status).set(0)
        self._versions |= seen

    def start(self, models: ModelRegistry) -> None:
        """Sample now (series exist before the first scrape), then every ``interval_s`` on a daemon thread."""
        self.sample()
        self.record_versions(models)

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()
                self.record_versions(models)

        self._thread = threading.Thread(target=loop, name="blda-worker-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1.0)
            self._thread = None
