"""Typed access to what the lifespan puts on ``app.state``, as FastAPI dependencies.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a
thread hand-off per dependency per request for what is an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.inference import InferenceRunner
from service.problems import Problem
from service.records import SegmentationObserver
from service.registry import (
    BadName,
    ModelNotFound,
    ModelRegistry,
    NotReady,
    RegistryError,
    VersionNotFound,
    VersionNotLoadable,
)
from service.settings import ServiceSettings
from service.sync import RegistrySync


async def get_settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise Problem("not-ready", "the service is starting: no model is loaded yet")
    sync: RegistrySync | None = getattr(request.app.state, "sync", None)
    if sync is not None:
        # An admin change made through another worker or replica applies here before this request.
        await sync.current()
    return registry


async def get_runner(request: Request) -> InferenceRunner:
    runner: InferenceRunner | None = getattr(request.app.state, "runner", None)
    if runner is None:
        raise Problem("not-ready", "the service is starting: no worker pool yet")
    return runner


async def get_observers(request: Request) -> list[SegmentationObserver]:
    observers: list[SegmentationObserver] = request.app.state.segmentation_observers
    return observers


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
RunnerDep = Annotated[InferenceRunner, Depends(get_runner)]
ObserversDep = Annotated[list[SegmentationObserver], Depends(get_observers)]

_PROBLEM_OF: dict[type[RegistryError], str] = {
    ModelNotFound: "model-not-found",
    VersionNotFound: "version-not-found",
    VersionNotLoadable: "version-not-loadable",
    NotReady: "not-ready",
    BadName: "invalid-request",
}


def problem_from(exc: RegistryError) -> Problem:
    return Problem(_PROBLEM_OF.get(type(exc), "internal-error"), str(exc))
