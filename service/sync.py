"""Every worker and replica converges on the same served versions after an admin call.

An admin call (reload, activate) runs in the worker that received it; that worker then publishes the
*desired* state to the shared store (:mod:`service.state`) and bumps a generation counter:

- ``registry/desired``: JSON ``{"reloads": {model: count}, "pins": {model: version}}``, written first;
- ``registry/generation``: incremented after, so a reader that sees generation g reads a desired state
  at least as new as g;
- ``registry/applied/<g>``: incremented by each worker once it serves generation g.

Each worker compares the shared generation with its own before every request that uses the registry
(one store read) and, when behind, catches up before serving: it reloads the models whose reload count
changed and activates the pinned versions. A watcher does the same every ``sync_interval_s`` so that
idle workers switch too. The admin answer waits (at most ``admin_sync_timeout_s``) until
``registry/applied/<g>`` counts every worker, and says how many switched.

The check before each request is what guarantees that no request started after an answer is served by
the old version; the wait only makes the answer say so. (With replicas sharing Redis, the applied count
gathers workers of every replica, so ``all_switched`` may come early; the per-request check still
holds.) When the store cannot be reached, workers keep serving what they have and log it.

Two admin calls at the same moment on different workers may lose one of the two changes of the desired
state (read, modify, write); admin calls are rare and answered with the state they produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from service.registry import ModelRegistry, RegistryError
from service.state import StateError, StateStore

log = logging.getLogger(__name__)

GENERATION = "registry/generation"
DESIRED = "registry/desired"
APPLIED = "registry/applied/"


@dataclass(frozen=True)
class SyncReport:
    generation: int
    workers_switched: int
    workers_expected: int

    @property
    def all_switched(self) -> bool:
        return self.workers_switched >= self.workers_expected


def _desired(store: StateStore) -> dict[str, Any]:
    raw = store.get(DESIRED)
    desired = json.loads(raw) if raw else {}
    return {"reloads": dict(desired.get("reloads", {})), "pins": dict(desired.get("pins", {}))}


class RegistrySync:
    """This worker's view of the shared registry generation; one per app."""

    def __init__(self, store: StateStore, registry: ModelRegistry, executor: Executor, workers: int) -> None:
        self.store = store
        self.registry = registry
        self.executor = executor
        self.workers = workers
        self.applied = 0
        self._reloads_seen: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._store_down = False

    def _generation(self) -> int:
        raw = self.store.get(GENERATION)
        return int(raw) if raw else 0

    def initialize(self) -> None:
        """At start, after the registry loaded from disk: adopt the pins of the current generation."""
        generation = self._generation()
        desired = _desired(self.store)
        # The bundles were just loaded from disk: the reloads up to now are already reflected.
        self._reloads_seen = {name: int(n) for name, n in desired["reloads"].items()}
        self._apply_pins(desired["pins"])
        self.applied = generation
        if generation:
            self.store.incr(APPLIED + str(generation))

    async def current(self) -> None:
        """Catch up with the shared generation before serving (cheap when already current)."""
        try:
            behind = self._generation() != self.applied
        except StateError as exc:
            # Availability first: serve what this worker has; say so once per outage.
            if not self._store_down:
                log.warning("registry sync: %s; serving the versions loaded here", exc)
            self._store_down = True
            return
        self._store_down = False
        if behind:
            await self._catch_up()

    async def _catch_up(self) -> None:
        async with self._lock:
            generation = self._generation()
            if generation == self.applied:
                return
            desired = _desired(self.store)
            await asyncio.get_running_loop().run_in_executor(self.executor, self._apply, desired)
            self.applied = generation
            self.store.incr(APPLIED + str(generation))
            log.info("registry generation %d applied", generation)

    def _apply(self, desired: dict[str, Any]) -> None:
        for name, count in desired["reloads"].items():
            if self._reloads_seen.get(name, 0) != count:
                try:
                    self.registry.reload(name)
                except RegistryError as exc:
                    log.warning("registry sync: reload of %s failed: %s", name, exc)
                self._reloads_seen[name] = int(count)
        self._apply_pins(desired["pins"])

    def _apply_pins(self, pins: dict[str, str]) -> None:
        for name, version in pins.items():
            try:
                state = self.registry.get(name)
                if state.pinned != version or state.active != version:
                    self.registry.activate(name, version)
            except RegistryError as exc:
                log.warning("registry sync: activating %s/%s failed: %s", name, version, exc)

    async def publish(self, change: Callable[[dict[str, Any]], None], reloaded: str | None = None) -> int:
        """Record a change this worker has made (``change`` edits the desired state); its generation."""
        async with self._lock:
            desired = _desired(self.store)
            change(desired)
            if reloaded is not None:
                self._reloads_seen[reloaded] = int(desired["reloads"][reloaded])
            self.store.put(DESIRED, json.dumps(desired).encode())
            generation = self.store.incr(GENERATION)
        await self._catch_up()  # also applies whatever other workers published meanwhile
        return generation

    async def wait_all(self, generation: int, timeout_s: float) -> SyncReport:
        """Wait until every worker serves ``generation`` (or a later one), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            raw = self.store.get(APPLIED + str(generation))
            switched = int(raw) if raw else 0
            if switched >= self.workers or time.monotonic() >= deadline or self._generation() > generation:
                return SyncReport(generation, min(switched, self.workers), self.workers)
            await asyncio.sleep(0.05)

    async def watch(self, interval_s: float) -> None:
        """Catch up every ``interval_s`` (idle workers switch too); runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.current()
            except Exception:  # a store hiccup must not end the watcher
                log.exception("registry sync failed; retrying in %g s", interval_s)
