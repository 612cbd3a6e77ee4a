"""Served pixels, sampled for the table refit and shared by every worker through the state store.

Each request's logits give ``pixels_per_request`` sampled decision pixels (calibration.traffic); a worker
buffers them and writes a chunk (npz bytes) once it holds ``chunk_pixels`` or every ``flush_s``. Chunks
go to ring slots numbered by ``incr`` (the store has no scan): ``traffic/<name>/<net>/seq`` counts the
chunks written, chunk n lives at ``traffic/<name>/<net>/slot/<n mod ring_slots>`` with a TTL of
``window_s``. The store thus holds at most ``ring_slots`` chunks per model network, from every worker and
replica, and a recalibration reads the slots. ``<net>`` is the model file's sha256 prefix: the logits do
not depend on the tables, so versions that differ only by their tables pool their traffic, and a new
network starts afresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from calibration.bundle import MODEL_FILE
from calibration.traffic import (
    TrafficSample,
    decode_sample,
    encode_sample,
    merge_samples,
    sample_decision_pixels,
)
from service.recalibration.settings import RecalibrationSettings
from service.records import SegmentationRecord
from service.registry import ModelRegistry, RegistryError
from service.state import StateError, StateStore

log = logging.getLogger(__name__)


def network_id(model_sha256: str) -> str:
    return model_sha256[:16]


def traffic_prefix(name: str, network: str) -> str:
    return f"traffic/{name}/{network}"


@dataclass
class _Buffer:
    chunks: list[np.ndarray] = field(default_factory=list)  # (C, P_i) each
    pixels: int = 0
    requests: int = 0
    first_s: float = 0.0
    last_s: float = 0.0


class TrafficAccumulator:
    """This worker's buffers (one per model network) and their writer to the shared state."""

    def __init__(
        self,
        store: StateStore,
        registry: ModelRegistry,
        settings: RecalibrationSettings,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self._clock = clock
        self._rng = np.random.default_rng(seed)
        self._buffers: dict[str, _Buffer] = {}
        self._lock = threading.Lock()

    def _network(self, name: str, version: str) -> str | None:
        try:
            state = self.registry.get(name).versions.get(version)
        except RegistryError:
            return None
        if state is None or state.model is None:
            return None
        return network_id(state.model.bundle.manifest.files[MODEL_FILE])

    def observe(self, record: SegmentationRecord) -> None:
        """A segmentation observer: sample the request's pixels (unless it opted out)."""
        if not self.settings.accumulate or not record.record:
            return
        network = self._network(record.model_name, record.model_version)
        if network is None:
            return
        size = (int(record.raw_decision.shape[0]), int(record.raw_decision.shape[1]))
        with self._lock:
            pixels = sample_decision_pixels(record.logits, size, self.settings.pixels_per_request, self._rng)
        now = self._clock()
        key = traffic_prefix(record.model_name, network)
        full = None
        with self._lock:
            buffer = self._buffers.setdefault(key, _Buffer(first_s=now))
            buffer.chunks.append(pixels)
            buffer.pixels += pixels.shape[1]
            buffer.requests += 1
            buffer.last_s = now
            if buffer.pixels >= self.settings.chunk_pixels:
                full = self._buffers.pop(key)
        if full is not None:
            self._write(key, full)

    def flush(self) -> None:
        """Write every buffer now (the periodic flusher, and a recalibration before it reads)."""
        with self._lock:
            buffers, self._buffers = self._buffers, {}
        for key, buffer in buffers.items():
            self._write(key, buffer)

    def _write(self, key: str, buffer: _Buffer) -> None:
        sample = TrafficSample(
            np.concatenate(buffer.chunks, axis=1), buffer.first_s, buffer.last_s, buffer.requests
        )
        try:
            n = self.store.incr(f"{key}/seq")
            slot = (n - 1) % self.settings.ring_slots
            self.store.put(f"{key}/slot/{slot}", encode_sample(sample), ttl_s=self.settings.window_s)
        except StateError as exc:  # traffic statistics are secondary: serving goes on
            log.warning("traffic sample of %d pixels dropped: %s", sample.num_pixels, exc)

    def read(self, name: str, network: str, num_classes: int) -> TrafficSample:
        """Every chunk in the shared state for this model network (all workers, the last window_s)."""
        key = traffic_prefix(name, network)
        chunks = []
        for slot in range(self.settings.ring_slots):
            raw = self.store.get(f"{key}/slot/{slot}")
            if raw is not None:
                chunks.append(decode_sample(raw, f"{key}/slot/{slot}"))
        return merge_samples(chunks, num_classes)


class PeriodicFlush:
    """Flushes an accumulator every ``interval_s`` in a daemon thread, so that a quiet worker's last
    pixels reach the shared state too."""

    def __init__(self, accumulator: TrafficAccumulator, interval_s: float) -> None:
        self._accumulator = accumulator
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blda-traffic-flush", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._accumulator.flush()
            except Exception:  # a bug here must not end the thread silently
                log.exception("traffic flush failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._accumulator.flush()
