"""``GET /v1/models`` and ``GET /v1/models/{name}``: what is loaded, what serves, what failed and why."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.dependencies import RegistryDep, problem_from
from service.names import ModelNameParam
from service.problems import redact
from service.registry import ModelState, RegistryError, VersionState

router = APIRouter(tags=["models"])


class CalibrationInfo(BaseModel):
    available: bool
    enabled_default: bool
    tau_default: float
    eps: float | None = None
    num_knots: int | None = None
    source_domain: str = ""
    target_domain: str = ""
    calibrators: list[str] = Field(default=["none"], description="what segment's calibrator= accepts")
    default_calibrator: str = "none"
    tuning_table: list[dict[str, Any]] = Field(
        default=[], description="the calibrators measured on the tuning split when the bundle was made"
    )


class VersionInfo(BaseModel):
    version: str
    status: str = Field(
        description="ready; failed (never loaded); stale (its last reload failed, the copy before serves)"
    )
    active: bool
    error: str | None = Field(description="why the last load failed")
    checked_at: str = Field(description="time of the last load attempt (UTC, ISO 8601)")
    providers: list[str] = []
    trained: bool | None = None
    network: str | None = None
    description: str = ""
    calibration: CalibrationInfo | None = None


class ModelSummary(BaseModel):
    name: str
    default: bool
    default_reason: str | None = Field(
        default=None,
        description="on the default model: why it is the default (settings, the only, first loaded)",
    )
    active_version: str | None
    pinned_version: str | None
    versions: list[VersionInfo]


class ClassEntry(BaseModel):
    id: int
    name: str
    color: tuple[int, int, int]


class ModelDetail(ModelSummary):
    classes: list[ClassEntry] = Field(description="classes of the active version")
    input: dict[str, Any] = Field(description="input normalisation and size of the active version")
    output: dict[str, Any] = Field(description="number of classes and stride of the logits")
    provenance: dict[str, Any] = Field(description="training provenance of the active version")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _version_info(state: VersionState, active: bool) -> VersionInfo:
    # Load errors name files: shown relative to the models directory, never as absolute paths.
    root = str(state.directory.parent.parent)
    info = VersionInfo(
        version=state.version,
        status=state.status,
        active=active,
        error=redact(state.error, root) if state.error else None,
        checked_at=_iso(state.checked_at),
    )
    model = state.model
    if model is None:
        return info
    manifest = model.bundle.manifest
    spec = manifest.calibration
    calibration = CalibrationInfo(
        available=model.has_calibration,
        enabled_default=model.calibrate_default,
        tau_default=model.tau_default,
        eps=spec.eps if spec else None,
        num_knots=spec.num_knots if spec else None,
        source_domain=spec.source_domain if spec else "",
        target_domain=spec.target_domain if spec else "",
        calibrators=model.calibrator_names,
        default_calibrator=model.default_calibrator,
        tuning_table=spec.tuning_table if spec else [],
    )
    return info.model_copy(
        update={
            "providers": list(model.providers),
            "trained": manifest.provenance.trained,
            "network": manifest.provenance.network,
            "description": manifest.description,
            "calibration": calibration,
        }
    )


def summarise(state: ModelState, default_name: str | None, default_reason: str | None = None) -> ModelSummary:
    is_default = state.name == default_name
    return ModelSummary(
        name=state.name,
        default=is_default,
        default_reason=default_reason if is_default else None,
        active_version=state.active,
        pinned_version=state.pinned,
        versions=[_version_info(v, v.version == state.active) for v in state.versions.values()],
    )


_P: dict[str, Any] = {"content": {"application/problem+json": {}}}


@router.get(
    "/v1/models",
    summary="List models, their versions and which version serves",
    responses={503: {"description": "Starting", **_P}},
)
async def list_models(registry: RegistryDep) -> list[ModelSummary]:
    return [summarise(state, registry.default_name, registry.default_reason) for state in registry.models()]


@router.get(
    "/v1/models/{name}",
    summary="One model: versions, classes, calibration and provenance",
    responses={
        404: {"description": "Unknown model", **_P},
        422: {"description": "Not a valid model name", **_P},
        503: {"description": "Starting", **_P},
    },
)
async def get_model(name: ModelNameParam, registry: RegistryDep) -> ModelDetail:
    try:
        state = registry.get(name)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    summary = summarise(state, registry.default_name, registry.default_reason)
    model = state.active_model
    if model is None:
        return ModelDetail(**summary.model_dump(), classes=[], input={}, output={}, provenance={})
    manifest = model.bundle.manifest
    return ModelDetail(
        **summary.model_dump(),
        classes=[ClassEntry(id=c.id, name=c.name, color=c.color) for c in manifest.classes],
        input=manifest.input.model_dump(mode="json"),
        output=manifest.output.model_dump(mode="json"),
        provenance=manifest.provenance.model_dump(mode="json"),
    )
