"""The FastAPI application: :func:`create_app` wires routers, handlers and the lifespan; nothing else.

Bundles load in the lifespan, never at import. Other parts of the service hook in through ``app.state``:
``segmentation_observers`` (a list of callables receiving a :class:`service.records.SegmentationRecord`
per served request; append before startup) and ``registry`` / ``runner`` / ``settings`` once started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from service.http import HeadLimitMiddleware
from service.inference import InferenceRunner, load_served_model
from service.logs import AccessLogMiddleware, configure_json_logging
from service.multiproc import reap_dead_workers
from service.openapi import component_schemas, install_openapi
from service.problems import install_problem_handlers
from service.recalibration.wiring import start_recalibration, stop_recalibration
from service.records import SegmentationObserver
from service.registry import ModelRegistry
from service.request_id import RequestIdMiddleware
from service.routes import admin, bias, feedback, health, metrics, models, recalibration, segment, web
from service.settings import ServiceSettings, load_settings
from service.state import MemoryStore, open_store
from service.sync import RegistrySync
from service.telemetry import HttpMetricsMiddleware, multiprocess_dir, start_monitoring, stop_monitoring

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServiceSettings = app.state.settings
    directory = multiprocess_dir()
    if directory is not None:
        # A worker restarted after its predecessor was killed: that one's live gauges go now.
        reap_dead_workers(directory)
    runner = InferenceRunner(settings)
    loader = partial(load_served_model, threads=settings.onnx_threads(), provider=settings.execution_provider)
    registry = ModelRegistry(settings.models_dir, loader, settings.pinned_versions, settings.default_model)
    await asyncio.get_running_loop().run_in_executor(runner.cpu_pool, registry.load_all)
    if not registry.ready:
        log.error(
            "no model serves yet (models_dir=%s): /readyz answers 503 until a reload", settings.models_dir
        )
    state = open_store(settings.state_url)
    app.state.state_store = state
    app.state.shared_state = None if isinstance(state, MemoryStore) else state
    sync = RegistrySync(state, registry, runner.cpu_pool, settings.workers)
    await asyncio.get_running_loop().run_in_executor(runner.cpu_pool, sync.initialize)
    watcher = asyncio.create_task(sync.watch(settings.sync_interval_s))
    app.state.sync = sync
    app.state.runner = runner
    app.state.registry = registry
    start_monitoring(app, registry)
    # After the sync's pins: a serving choice persisted on disk (activate, rollback) wins at start.
    await asyncio.get_running_loop().run_in_executor(
        runner.cpu_pool, start_recalibration, app, registry, state
    )
    try:
        yield
    finally:
        watcher.cancel()
        stop_recalibration(app)
        stop_monitoring(app)
        app.state.sync = None
        state.close()
        app.state.registry = None
        app.state.runner = None
        runner.shutdown()


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings if settings is not None else load_settings()
    app = FastAPI(
        title="BLDA segmentation service",
        summary="Semantic segmentation with BLDA's logit-distribution calibration, toggled per request.",
        version="0.1.0",
        lifespan=lifespan,
        # Served by routes.web from a packaged copy of the assets, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = None
    app.state.runner = None
    app.state.sync = None
    app.state.recalibration = None
    observers: list[SegmentationObserver] = []
    app.state.segmentation_observers = observers
    install_problem_handlers(app)
    if settings.log_format == "json":
        configure_json_logging()
        # Inside the request-id middleware: the line carries the id.
        app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    # Outermost: an oversized head costs nothing further.
    app.add_middleware(HeadLimitMiddleware, max_bytes=settings.max_header_bytes)
    for module in (segment, models, admin, recalibration, health, web, feedback, bias, metrics):
        app.include_router(module.router)
    web.mount_docs_assets(app)
    install_openapi(app, component_schemas(segment.SegmentationJson))
    return app


def app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --factory`` (and so for several workers): settings from the environment."""
    return create_app(load_settings())
