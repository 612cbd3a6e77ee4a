"""Live recalibration on ``app.state.recalibration``: created in the lifespan after the registry, the
shared state and the telemetry; the persisted serving choice applied before the first request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from service.recalibration.accumulator import PeriodicFlush, TrafficAccumulator
from service.recalibration.choice import read_choice
from service.recalibration.settings import RecalibrationSettings
from service.recalibration.shadow import ShadowMonitor
from service.registry import ModelRegistry, RegistryError
from service.state import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    settings: RecalibrationSettings
    accumulator: TrafficAccumulator
    shadow: ShadowMonitor
    flusher: PeriodicFlush
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one recalibration at a time per process


def apply_persisted_choices(registry: ModelRegistry) -> None:
    """Serve the version each model's serving.json names (an activation or rollback that outlived a
    restart); a version that is gone or fails to load is logged and the registry's own choice serves."""
    for state in registry.models():
        try:
            choice = read_choice(registry.models_dir, state.name)
        except ValueError as exc:
            log.warning("model %s: %s; ignoring it", state.name, exc)
            continue
        if choice.active is None or (state.pinned == choice.active and state.active == choice.active):
            continue
        try:
            registry.activate(state.name, choice.active)
        except RegistryError as exc:
            log.warning(
                "model %s: the persisted active version %s does not serve: %s", state.name, choice.active, exc
            )


def start_recalibration(app: Any, registry: ModelRegistry, store: StateStore) -> Recalibration:
    settings = RecalibrationSettings()
    apply_persisted_choices(registry)
    accumulator = TrafficAccumulator(store, registry, settings)
    shadow = ShadowMonitor(registry, registry.models_dir, settings, app.state.telemetry.registry, store=store)
    flusher = PeriodicFlush(accumulator, settings.flush_s)
    flusher.start()
    app.state.segmentation_observers.extend([accumulator.observe, shadow.observe])
    recalibration = Recalibration(settings, accumulator, shadow, flusher)
    app.state.recalibration = recalibration
    return recalibration


def stop_recalibration(app: Any) -> None:
    recalibration: Recalibration | None = getattr(app.state, "recalibration", None)
    if recalibration is None:
        return
    observers = app.state.segmentation_observers
    for hook in (recalibration.accumulator.observe, recalibration.shadow.observe):
        if hook in observers:
            observers.remove(hook)
    recalibration.flusher.stop()
    app.state.recalibration = None
