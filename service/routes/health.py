"""``GET /healthz`` (the process answers) and ``GET /readyz`` (a model serves)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.problems import PROBLEM_MEDIA_TYPE, problem_response
from service.registry import ModelRegistry

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the default model has a loaded version",
    responses={503: {"description": "Not ready", "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
async def readyz(request: Request) -> JSONResponse:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    request_id = getattr(request.state, "request_id", None)
    if registry is None:
        return problem_response("not-ready", "the service is starting", request_id)
    if not registry.ready:
        detail = (
            f"no loadable bundle in {registry.models_dir}"
            if registry.default_name is None
            else f"model {registry.default_name!r} has no loadable version"
        )
        return problem_response("not-ready", detail, request_id)
    active = {state.name: state.active for state in registry.models()}
    return JSONResponse(
        {"status": "ready", "default_model": registry.default_name, "active_versions": active}
    )
