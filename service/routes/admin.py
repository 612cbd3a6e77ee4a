"""Admin: ``POST /v1/models/{name}/reload`` and ``POST /v1/models/{name}/versions/{version}/activate``
(recorded in ``<name>/serving.json``, service.recalibration.choice, so that it outlives a restart).

Authenticated by the ``X-API-Key`` header, compared in constant time with the configured key. Without a
configured key (``BLDA_ADMIN_API_KEY``) these endpoints answer 403 ``admin-disabled``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from service.dependencies import RegistryDep, RunnerDep, SettingsDep, problem_from
from service.inference import InferenceRunner
from service.names import ModelNameParam, VersionParam
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.recalibration.choice import read_choice_or_fresh, write_choice
from service.registry import ModelRegistry, RegistryError
from service.routes.models import ModelSummary, summarise
from service.settings import ServiceSettings
from service.sync import RegistrySync

log = logging.getLogger(__name__)

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
        422: {"description": "Not a valid model name or version", **_PROBLEM},
        503: {"description": "Starting", **_PROBLEM},
    },
)


class WorkerSync(BaseModel):
    generation: int = Field(description="the registry generation this change created")
    workers_switched: int = Field(description="workers of this service serving it when the answer was sent")
    workers_expected: int = Field(description="workers per replica (BLDA_WORKERS)")
    all_switched: bool = Field(
        description="every worker serves the change: a request sent after this answer is served by it"
    )


class AdminResult(ModelSummary):
    sync: WorkerSync


async def synced(
    request: Request,
    settings: ServiceSettings,
    change: Callable[[dict[str, Any]], None],
    reloaded: str | None,
) -> WorkerSync:
    sync: RegistrySync | None = getattr(request.app.state, "sync", None)
    if sync is None:
        raise Problem("not-ready", "the service is starting: no shared state yet")
    generation = await sync.publish(change, reloaded)
    report = await sync.wait_all(generation, settings.admin_sync_timeout_s)
    if not report.all_switched:
        log.warning(
            "registry generation %d: %d of %d workers switched within %g s",
            generation,
            report.workers_switched,
            report.workers_expected,
            settings.admin_sync_timeout_s,
        )
    return WorkerSync(
        generation=report.generation,
        workers_switched=report.workers_switched,
        workers_expected=report.workers_expected,
        all_switched=report.all_switched,
    )


@router.post(
    "/v1/models/{name}/reload",
    summary="Load every version of a model from disk again, in every worker",
    description="A version that fails to load is reported in the answer; the copy loaded before keeps "
    "serving. The answer comes once every worker has reloaded (or after BLDA_ADMIN_SYNC_TIMEOUT_S; "
    "`sync` says which).",
)
async def reload_model(
    name: ModelNameParam, request: Request, registry: RegistryDep, runner: RunnerDep, settings: SettingsDep
) -> AdminResult:
    try:
        # Loading reads files and builds sessions: off the event loop.
        await asyncio.get_running_loop().run_in_executor(runner.cpu_pool, registry.reload, name)
    except RegistryError as exc:
        raise problem_from(exc) from exc

    def count_reload(desired: dict[str, Any]) -> None:
        desired["reloads"][name] = int(desired["reloads"].get(name, 0)) + 1

    sync = await synced(request, settings, count_reload, reloaded=name)
    return AdminResult(**summarise(registry.get(name), registry.default_name).model_dump(), sync=sync)


@router.post(
    "/v1/models/{name}/versions/{version}/activate",
    summary="Serve this version of the model in every worker (a pin kept across reloads)",
    responses={409: {"description": "The version failed to load", **_PROBLEM}},
)
async def activate_version(
    name: ModelNameParam,
    version: VersionParam,
    request: Request,
    registry: RegistryDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> AdminResult:
    sync = await activate_everywhere(request, registry, runner, settings, name, version)
    return AdminResult(**summarise(registry.get(name), registry.default_name).model_dump(), sync=sync)


async def activate_everywhere(
    request: Request,
    registry: ModelRegistry,
    runner: InferenceRunner,
    settings: ServiceSettings,
    name: str,
    version: str,
) -> WorkerSync:
    """Serve ``version`` in every worker, and record it in ``<name>/serving.json`` so that it outlives a
    restart (the version it replaced becomes the rollback target)."""
    try:
        replaced = registry.get(name).active
        # The registry's lock may be held by a reload: wait for it off the event loop.
        await asyncio.get_running_loop().run_in_executor(runner.cpu_pool, registry.activate, name, version)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    choice = read_choice_or_fresh(registry.models_dir, name)
    write_choice(registry.models_dir, name, choice.activated(version, replaced))

    def pin(desired: dict[str, Any]) -> None:
        desired["pins"][name] = version

    return await synced(request, settings, pin, reloaded=None)
