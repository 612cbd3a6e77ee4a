"""``GET /v1/models/{name}/bias``: live per-class bias figures of this process, as JSON.

For people without Prometheus. The figures are those of the recording rules in
``deploy/prometheus/rules/`` but over this worker's traffic since it started (not a time window, not
summed over workers or replicas): see :func:`service.telemetry.bias_report` for the definitions.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from service.dependencies import RegistryDep, problem_from
from service.names import ModelNameParam
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.recalibration.wiring import Recalibration
from service.registry import RegistryError
from service.telemetry import Telemetry

router = APIRouter(tags=["monitoring"])


@router.get(
    "/v1/models/{name}/bias",
    summary="Per-class predicted shares, label-free bias and drift, flip rates and feedback IoU/Bias(l)",
    responses={
        404: {"description": "Unknown model", "content": {PROBLEM_MEDIA_TYPE: {}}},
        503: {"description": "Starting", "content": {PROBLEM_MEDIA_TYPE: {}}},
    },
)
def model_bias(name: ModelNameParam, request: Request, registry: RegistryDep) -> dict[str, Any]:
    telemetry: Telemetry | None = getattr(request.app.state, "telemetry", None)
    if telemetry is None:
        raise Problem("not-ready", "the service is starting: no statistics yet")
    recalibration: Recalibration | None = getattr(request.app.state, "recalibration", None)
    try:
        state = registry.get(name)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    return {
        "model": name,
        "active_version": state.active,
        "process_id": os.getpid(),
        "scope": "this worker process since it started",
        "versions": telemetry.report(name),
        # The candidate of a recalibration beside the active version (service.recalibration.shadow).
        "shadow": recalibration.shadow.report(name) if recalibration is not None else [],
    }
