"""Admin: live recalibration. ``POST /v1/models/{name}/recalibrate`` (refit the target tables from the
traffic sample, write them as a new version, run it in shadow), ``POST /v1/models/{name}/rollback``
(serve the version the last activation replaced) and ``GET /v1/models/{name}/traffic`` (the traffic
sample as an npz file, for `blda bundle recalibrate` offline). Activation itself is
``POST /v1/models/{name}/versions/{version}/activate`` (service.routes.admin)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from calibration.bundle import MODEL_FILE
from calibration.refit import RefitConfig
from calibration.traffic import TrafficSample, encode_sample, refit_from_traffic
from service.dependencies import RegistryDep, RunnerDep, SettingsDep, problem_from
from service.inference import ServedModel
from service.names import NAME_PATTERN, ModelNameParam
from service.problems import Problem
from service.recalibration.accumulator import network_id
from service.recalibration.candidate import recalibration_provenance, write_candidate
from service.recalibration.choice import read_choice_or_fresh, write_choice
from service.recalibration.wiring import Recalibration
from service.registry import ModelRegistry, RegistryError, VersionNotFound, VersionNotLoadable
from service.routes.admin import _PROBLEM, AdminResult, activate_everywhere, synced
from service.routes.admin import router as admin_router
from service.routes.models import summarise

router = APIRouter(tags=["admin"], dependencies=admin_router.dependencies, responses=admin_router.responses)

BaseVersionQuery = Annotated[
    str | None,
    Query(pattern=NAME_PATTERN, description="the version whose tables are refitted; default: the active one"),
]


class RecalibrationResult(AdminResult):
    base_version: str
    candidate_version: str = Field(description="the new version, loaded and running in shadow")
    recalibration: dict[str, Any] = Field(
        description="as in the candidate's provenance.data.recalibration: window, requests, pixels, "
        "pixels_per_class, kept_current_rows, held_out_pixels, pit_before, pit_after"
    )


def _recalibration(request: Request) -> Recalibration:
    recalibration: Recalibration | None = getattr(request.app.state, "recalibration", None)
    if recalibration is None:
        raise Problem("not-ready", "the service is starting: no traffic sample yet")
    return recalibration


def _version(registry: ModelRegistry, name: str, version: str | None) -> ServedModel:
    state = registry.get(name)
    chosen = version if version is not None else state.active
    target = state.versions.get(chosen) if chosen is not None else None
    if target is None:
        raise VersionNotFound(
            f"expected one of the versions {list(state.versions)} of {name}, got {chosen!r}"
        )
    if target.model is None:
        raise VersionNotLoadable(f"{name}/{chosen} failed to load: {target.error}")
    return target.model


def _traffic(recalibration: Recalibration, base: ServedModel) -> TrafficSample:
    recalibration.accumulator.flush()  # this worker's last pixels; the others flush every flush_s
    network = network_id(base.bundle.manifest.files[MODEL_FILE])
    return recalibration.accumulator.read(base.name, network, base.num_classes)


@router.post(
    "/v1/models/{name}/recalibrate",
    summary="Refit the target tables from live traffic into a new version and run it in shadow",
    description="The core refit (calibration.refit, as `blda export` and `blda bundle create`) on the "
    "pixels sampled from served requests of this model's network (every worker, the last "
    "BLDA_RECALIBRATION_WINDOW_S), the base version's source pairs and anchors, and its target rows where "
    "fewer than `min_row_pixels` pixels were seen. The active version keeps serving (it is pinned); the "
    "candidate is decided beside it on BLDA_RECALIBRATION_SHADOW_FRACTION of the calibrated requests.",
    responses={409: {"description": "Too little traffic, or the base version failed to load", **_PROBLEM}},
)
async def recalibrate(
    name: ModelNameParam,
    request: Request,
    registry: RegistryDep,
    runner: RunnerDep,
    settings: SettingsDep,
    version: BaseVersionQuery = None,
    min_row_pixels: Annotated[
        int, Query(ge=1, description="fewer pixels of a class: keep its row")
    ] = RefitConfig.min_row_pixels,
    min_pixels: Annotated[
        int | None, Query(ge=1, description="default BLDA_RECALIBRATION_MIN_PIXELS")
    ] = None,
) -> RecalibrationResult:
    recalibration = _recalibration(request)
    try:
        base = _version(registry, name, version)
        active = registry.get(name).active
    except RegistryError as exc:
        raise problem_from(exc) from exc
    if base.bundle.tables is None:
        raise Problem("calibration-unavailable", f"{name}/{base.version} has no calibration tables to refit")
    needed = min_pixels if min_pixels is not None else recalibration.settings.min_pixels
    config = RefitConfig(min_row_pixels=min_row_pixels)
    async with recalibration.lock:  # one at a time per process: two would pick the same next version
        sample = await runner.in_thread(_traffic, recalibration, base)
        if sample.num_pixels < needed:
            raise Problem(
                "not-enough-traffic",
                f"expected at least {needed} sampled pixels of {name} traffic, got {sample.num_pixels} "
                f"from {sample.requests} requests: send more traffic or lower min_pixels",
            )
        tables, refit = await runner.in_thread(refit_from_traffic, sample.pixels, base.bundle.tables, config)
        provenance = recalibration_provenance(base.bundle, sample, refit, config, "live traffic")
        if active is not None:
            # Pinned everywhere before the candidate exists: it is the highest version, and a worker that
            # reloads (or restarts) unpinned would serve it.
            try:
                await runner.in_thread(registry.activate, name, active)
            except RegistryError as exc:
                raise problem_from(exc) from exc
            write_choice(
                registry.models_dir,
                name,
                replace(read_choice_or_fresh(registry.models_dir, name), active=active),
            )

            def pin(desired: dict[str, Any]) -> None:
                desired["pins"][name] = active

            await synced(request, settings, pin, reloaded=None)
        path = await runner.in_thread(write_candidate, registry.models_dir, base.bundle, tables, provenance)
        candidate = path.name
        try:
            await runner.in_thread(registry.reload, name)
        except RegistryError as exc:
            raise problem_from(exc) from exc
        write_choice(
            registry.models_dir,
            name,
            replace(read_choice_or_fresh(registry.models_dir, name), shadow=candidate),
        )

        def count_reload(desired: dict[str, Any]) -> None:
            desired["reloads"][name] = int(desired["reloads"].get(name, 0)) + 1

        sync = await synced(request, settings, count_reload, reloaded=name)
    return RecalibrationResult(
        **summarise(registry.get(name), registry.default_name).model_dump(),
        sync=sync,
        base_version=base.version,
        candidate_version=candidate,
        recalibration=provenance,
    )


@router.post(
    "/v1/models/{name}/rollback",
    summary="Serve again the version the last activation replaced, in every worker (kept across restarts)",
    responses={409: {"description": "No activation to roll back", **_PROBLEM}},
)
async def rollback(
    name: ModelNameParam, request: Request, registry: RegistryDep, runner: RunnerDep, settings: SettingsDep
) -> AdminResult:
    try:
        registry.get(name)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    previous = read_choice_or_fresh(registry.models_dir, name).previous
    if previous is None:
        raise Problem("no-previous-version", f"{name}: expected an earlier activation to roll back, got none")
    sync = await activate_everywhere(request, registry, runner, settings, name, previous)
    return AdminResult(**summarise(registry.get(name), registry.default_name).model_dump(), sync=sync)


@router.get(
    "/v1/models/{name}/traffic",
    summary="The traffic sample of a version's network (npz: pixels (C, P) float32, window, requests)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def traffic(
    name: ModelNameParam,
    request: Request,
    registry: RegistryDep,
    runner: RunnerDep,
    version: BaseVersionQuery = None,
) -> Response:
    recalibration = _recalibration(request)
    try:
        base = _version(registry, name, version)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    sample = await runner.in_thread(_traffic, recalibration, base)
    body = await runner.in_thread(encode_sample, sample)
    return Response(
        body,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}-traffic.npz"'},
    )
