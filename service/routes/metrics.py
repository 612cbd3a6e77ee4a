"""``GET /metrics``: the Prometheus exposition of this process, or of every worker in multiprocess mode."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from service.multiproc import reap_dead_workers
from service.telemetry import Telemetry, multiprocess_dir, register_loaded_versions

router = APIRouter(tags=["monitoring"])


@router.get("/metrics", summary="Prometheus metrics (summed over worker processes)", response_class=Response)
def metrics(request: Request) -> Response:
    # Sync handler: reading the multiprocess files is blocking I/O, so FastAPI runs it in a thread.
    telemetry: Telemetry | None = getattr(request.app.state, "telemetry", None)
    models = getattr(request.app.state, "registry", None)
    if telemetry is not None and models is not None:
        register_loaded_versions(telemetry, models)  # a version loaded by a reload starts at 0
    directory = multiprocess_dir()
    if directory is not None:
        # A fresh registry per scrape: the collector reads every worker's files; a killed worker's live
        # gauges go first.
        reap_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    body = generate_latest(telemetry.registry) if telemetry is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
