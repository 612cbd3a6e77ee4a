"""Admin: ``POST /v1/models/{name}/reload`` and ``POST /v1/models/{name}/versions/{version}/activate``.

Authenticated by the ``X-API-Key`` header, compared in constant time with the configured key. Without a
configured key (``BLDA_ADMIN_API_KEY``) these endpoints answer 403 ``admin-disabled``.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Security
from fastapi.security import APIKeyHeader

from service.dependencies import RegistryDep, RunnerDep, SettingsDep, problem_from
from service.names import ModelNameParam, VersionParam
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.registry import RegistryError
from service.routes.models import ModelSummary, summarise

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the admin key (BLDA_ADMIN_API_KEY)")


async def require_admin(settings: SettingsDep, key: Annotated[str | None, Security(_api_key)]) -> None:
    if settings.admin_api_key is None:
        raise Problem("admin-disabled", "admin endpoints are disabled: set BLDA_ADMIN_API_KEY to enable them")
    if not key:
        raise Problem("unauthorized", "expected an X-API-Key header, got none")
    expected = settings.admin_api_key.get_secret_value().encode()
    if not hmac.compare_digest(key.encode(), expected):
        raise Problem("forbidden", "expected the configured admin key in X-API-Key, got another value")


_PROBLEM: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}
router = APIRouter(
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={
        401: {"description": "No API key", **_PROBLEM},
        403: {"description": "Wrong API key, or admin disabled", **_PROBLEM},
        404: {"description": "Unknown model or version", **_PROBLEM},
    },
)


@router.post(
    "/v1/models/{name}/reload",
    summary="Load every version of a model from disk again",
    description="A version that fails to load is reported in the answer; the copy loaded before keeps "
    "serving.",
)
async def reload_model(name: ModelNameParam, registry: RegistryDep, runner: RunnerDep) -> ModelSummary:
    try:
        # Loading reads files and builds sessions: off the event loop.
        state = await asyncio.get_running_loop().run_in_executor(runner.cpu_pool, registry.reload, name)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    return summarise(state, registry.default_name)


@router.post(
    "/v1/models/{name}/versions/{version}/activate",
    summary="Serve this version of the model (a pin kept across reloads)",
    responses={409: {"description": "The version failed to load", **_PROBLEM}},
)
async def activate_version(
    name: ModelNameParam, version: VersionParam, registry: RegistryDep, runner: RunnerDep
) -> ModelSummary:
    try:
        # The registry's lock may be held by a reload: wait for it off the event loop.
        state = await asyncio.get_running_loop().run_in_executor(
            runner.cpu_pool, registry.activate, name, version
        )
    except RegistryError as exc:
        raise problem_from(exc) from exc
    return summarise(state, registry.default_name)
