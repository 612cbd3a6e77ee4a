"""``GET /healthz`` (the process answers) and ``GET /readyz`` (a model serves)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.admission import load, overload
from service.inference import InferenceRunner
from service.problems import PROBLEM_MEDIA_TYPE, problem_response
from service.registry import ModelRegistry
from service.settings import ServiceSettings
from service.sync import RegistrySync

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the default model has a loaded version",
    responses={
        503: {
            "description": "Not ready (no model), or overloaded (Retry-After)",
            "content": {PROBLEM_MEDIA_TYPE: {}},
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    request_id = getattr(request.state, "request_id", None)
    if registry is None:
        return problem_response("not-ready", "the service is starting", request_id)
    sync: RegistrySync | None = getattr(request.app.state, "sync", None)
    if sync is not None:
        await sync.current()  # the versions this worker reports are the ones every worker serves
    if not registry.ready:
        detail = (
            "no loadable bundle in the models directory"
            if registry.default_name is None
            else f"model {registry.default_name!r} has no loadable version"
        )
        return problem_response("not-ready", detail, request_id)
    runner: InferenceRunner | None = getattr(request.app.state, "runner", None)
    settings: ServiceSettings = request.app.state.settings
    if runner is not None:
        # A probe that says "ready" while every request gets 503 keeps traffic coming to this process.
        busy = overload(runner, settings)
        if busy is not None:
            return problem_response(
                "overloaded", f"expected spare capacity, got {busy}", request_id, headers={"Retry-After": "1"}
            )
    active = {state.name: state.active for state in registry.models()}
    body: dict[str, Any] = {
        "status": "ready",
        "default_model": registry.default_name,
        "active_versions": active,
    }
    if runner is not None:
        body["load"] = load(runner, settings)
    if sync is not None:
        body["registry_generation"] = sync.applied
    return JSONResponse(body)
