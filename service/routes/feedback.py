"""``POST /v1/feedback``: the ground truth of a served request, feeding the live confusion counts.

Body, either

- ``multipart/form-data`` with a text field ``request_id`` and a file field ``mask``, or
- ``application/json``: ``{"request_id": "...", "mask": "<base64 of the PNG>"}``;

where ``request_id`` is the ``X-Request-Id`` of a segmentation served by this process in the last
``BLDA_FEEDBACK_TTL_S`` seconds, and ``mask`` an 8-bit single-channel PNG (mode L or P) of class ids
(255 = ignore) of exactly the served image's size. The mask is compared, at the image's resolution,
with the raw and (when calibration ran) the calibrated decision of that request.

Answers: 200 with the request's pixel accuracy; 404 for an unknown or expired id (or one served by
another worker: see :mod:`service.feedback`); 409 for a second feedback on the same id; 422 for a
mask that cannot be compared (size, mode, class ids). Errors are problem details.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.admission import upload_slot, work_slot
from service.feedback import FeedbackError, FeedbackStore, MaskError, decode_mask, feedback_confusion
from service.inference import InferenceRunner
from service.problems import PROBLEM_MEDIA_TYPE, TYPE_PREFIX, Problem, redact
from service.request_id import REQUEST_ID_PATTERN
from service.settings import ServiceSettings
from service.telemetry import Telemetry
from service.uploads import MULTIPART, BodyLimits, media_type, multipart_form, read_body

log = logging.getLogger(__name__)

router = APIRouter(tags=["monitoring"])

JSON = "application/json"

# slug -> (status, title). Stable API, like service.problems.PROBLEM_TYPES.
FEEDBACK_PROBLEMS: dict[str, tuple[int, str]] = {
    "request-not-found": (404, "Request not found"),
    "feedback-already-given": (409, "Feedback already given"),
    "invalid-mask": (422, "Invalid mask"),
}
_PROBLEM_OF_REASON = {"unknown": "request-not-found", "used": "feedback-already-given"}


def _problem(slug: str, detail: str, request: Request, **extensions: Any) -> JSONResponse:
    status, title = FEEDBACK_PROBLEMS[slug]
    request_id = getattr(request.state, "request_id", None)
    public = redact(detail)
    if public != detail:
        log.info("feedback problem %s (request id %s): %s", slug, request_id, detail)
    body: dict[str, Any] = {"type": TYPE_PREFIX + slug, "title": title, "status": status, "detail": public}
    if request_id:
        body["request_id"] = request_id
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def _invalid(detail: str) -> Problem:
    return Problem("invalid-request", detail)


async def _read_feedback(request: Request, limits: BodyLimits, expected_id: str | None) -> tuple[str, bytes]:
    """(request id, mask PNG bytes) from a multipart or JSON body; the body may leave out the id when
    the query gives it, and must agree with it when both do."""
    served_id, mask = await _parse_feedback(request, limits, expected_id is None)
    if expected_id is None:
        assert served_id is not None
        return served_id, mask
    if served_id is not None and served_id != expected_id:
        raise _invalid(f"request_id: expected the query's {expected_id!r} in the body too, got {served_id!r}")
    return expected_id, mask


async def _parse_feedback(
    request: Request, limits: BodyLimits, id_required: bool
) -> tuple[str | None, bytes]:
    kind = media_type(request)
    if kind not in (MULTIPART, JSON):
        raise Problem(
            "unsupported-media-type", f"expected Content-Type {MULTIPART} or {JSON}, got {kind or 'none'!r}"
        )
    body = await read_body(request, limits)
    if kind == JSON:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _invalid(f"body: expected JSON, got unparsable text ({exc})") from exc
        if not isinstance(payload, dict):
            raise _invalid(f"body: expected a JSON object, got {type(payload).__name__}")
        request_id, mask = payload.get("request_id"), payload.get("mask")
        if (request_id is not None or id_required) and (not isinstance(request_id, str) or not request_id):
            raise _invalid(f"request_id: expected a non-empty string, got {_shown(request_id)}")
        if not isinstance(mask, str):
            raise Problem("invalid-request", f"mask: expected base64 of a PNG, got {type(mask).__name__}")
        try:
            return request_id, base64.b64decode(mask, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(
                "invalid-request", f"mask: expected base64 of a PNG, got invalid base64 ({exc})"
            ) from exc
    return await _read_multipart(request, body, id_required)


def _shown(value: object) -> str:
    """A client's value in an error message: short JSON scalars as they are, anything else by type."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return type(value).__name__


async def _read_multipart(request: Request, body: bytes, id_required: bool) -> tuple[str | None, bytes]:
    async with multipart_form(request, body, max_fields=4) as form:
        request_id, mask = form.get("request_id"), form.get("mask")
        if request_id is None and not id_required:
            pass
        elif not isinstance(request_id, str) or not request_id:
            raise Problem("invalid-request", f"request_id: expected a text field, got fields {list(form)}")
        if not isinstance(mask, UploadFile):
            raise Problem("invalid-request", f"mask: expected a PNG file field, got fields {list(form)}")
        return request_id, await mask.read()


_FEEDBACK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "request_id": {
                            "type": "string",
                            "description": "X-Request-Id of the segmentation (or give it in the query)",
                        },
                        "mask": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": "base64 of the PNG",
                        },
                    },
                    "required": ["mask"],
                }
            },
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "mask": {"type": "string", "format": "binary", "description": "the PNG of class ids"},
                    },
                    "required": ["mask"],
                }
            },
        },
    }
}
_P: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}


@router.post(
    "/v1/feedback",
    summary="Ground truth (PNG of class ids, 255 = ignore) for a request served in the last minutes",
    description="Body: JSON `{request_id, mask: base64 PNG}` or multipart with a `request_id` field and a "
    "`mask` file. With `?request_id=` the id is checked before the mask is read.",
    openapi_extra=_FEEDBACK_BODY,
    responses={
        404: {"description": "Unknown or expired request id", **_P},
        408: {"description": "The body did not arrive in time", **_P},
        409: {"description": "Feedback already given for this request", **_P},
        413: {"description": "Body over the byte limit", **_P},
        415: {"description": "Neither JSON nor multipart/form-data", **_P},
        422: {"description": "Mask of the wrong size, mode or class ids, or a malformed body", **_P},
        503: {"description": "Starting, or too many requests in progress (Retry-After)", **_P},
    },
)
async def post_feedback(
    request: Request,
    request_id: Annotated[
        str | None,
        Query(
            pattern=REQUEST_ID_PATTERN,
            description="the served request's X-Request-Id; given here, it is checked before the body is read",
        ),
    ] = None,
) -> JSONResponse:
    store: FeedbackStore | None = getattr(request.app.state, "feedback_store", None)
    telemetry: Telemetry | None = getattr(request.app.state, "telemetry", None)
    runner: InferenceRunner | None = getattr(request.app.state, "runner", None)
    if store is None or telemetry is None or runner is None:
        raise Problem("not-ready", "the service is starting: feedback is not accepted yet")
    settings: ServiceSettings = request.app.state.settings
    if request_id is not None:
        # An unknown id costs the client nothing but this answer: no mask is read.
        try:
            store.peek(request_id)
        except FeedbackError as exc:
            return _problem(_PROBLEM_OF_REASON[exc.reason], str(exc), request, feedback_for=request_id)
    with upload_slot(runner, settings):
        served_id, data = await _read_feedback(request, BodyLimits.of(settings), request_id)
    with work_slot(runner, settings):
        try:
            prediction = store.peek(served_id)
            truth = await run_in_threadpool(decode_mask, data, prediction.input_size, prediction.num_classes)
            prediction = store.claim(served_id)  # a concurrent feedback for the same id loses here
        except FeedbackError as exc:
            return _problem(_PROBLEM_OF_REASON[exc.reason], str(exc), request, feedback_for=served_id)
        except MaskError as exc:
            return _problem("invalid-mask", str(exc), request, feedback_for=served_id)
        confusion = await run_in_threadpool(feedback_confusion, prediction, truth)  # (2, C, C)
    telemetry.observe_feedback(prediction.model_name, prediction.model_version, confusion)
    recalibration = getattr(request.app.state, "recalibration", None)
    if recalibration is not None:  # a shadowed request: score the shadow version too (live recalibration)
        await run_in_threadpool(recalibration.shadow.observe_feedback, prediction, truth)
    labelled = int(confusion[0].sum())
    correct = np.trace(confusion, axis1=1, axis2=2)  # (2,)
    calibrated = prediction.calibrated is not None
    accuracy = {
        "raw": float(correct[0] / labelled) if labelled else None,
        "calibrated": float(correct[1] / labelled) if labelled and calibrated else None,
    }
    return JSONResponse(
        {
            "feedback_for": served_id,
            "model": prediction.model_name,
            "version": prediction.model_version,
            "labelled_pixels": labelled,
            "calibrated": calibrated,
            "pixel_accuracy": accuracy,
        }
    )
