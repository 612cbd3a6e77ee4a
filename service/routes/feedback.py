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
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.feedback import FeedbackError, FeedbackStore, MaskError, decode_mask, feedback_confusion
from service.problems import PROBLEM_MEDIA_TYPE, TYPE_PREFIX, Problem
from service.settings import ServiceSettings
from service.telemetry import Telemetry
from service.uploads import MULTIPART, media_type, multipart_form, read_body

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
    body: dict[str, Any] = {"type": TYPE_PREFIX + slug, "title": title, "status": status, "detail": detail}
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def _invalid(detail: str) -> Problem:
    return Problem("invalid-request", detail)


async def _read_feedback(request: Request, limit: int) -> tuple[str, bytes]:
    """(request id, mask PNG bytes) from a multipart or JSON body."""
    kind = media_type(request)
    if kind not in (MULTIPART, JSON):
        raise Problem(
            "unsupported-media-type", f"expected Content-Type {MULTIPART} or {JSON}, got {kind or 'none'!r}"
        )
    body = await read_body(request, limit)
    if kind == JSON:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _invalid(f"body: expected JSON, got unparsable text ({exc})") from exc
        if not isinstance(payload, dict):
            raise _invalid(f"body: expected a JSON object, got {type(payload).__name__}")
        request_id, mask = payload.get("request_id"), payload.get("mask")
        if not isinstance(request_id, str) or not request_id:
            raise _invalid(f"request_id: expected a non-empty string, got {request_id!r}")
        if not isinstance(mask, str):
            raise Problem("invalid-request", f"mask: expected base64 of a PNG, got {type(mask).__name__}")
        try:
            return request_id, base64.b64decode(mask, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(
                "invalid-request", f"mask: expected base64 of a PNG, got invalid base64 ({exc})"
            ) from exc
    return await _read_multipart(request, body)


async def _read_multipart(request: Request, body: bytes) -> tuple[str, bytes]:
    async with multipart_form(request, body, max_fields=4) as form:
        request_id, mask = form.get("request_id"), form.get("mask")
        if not isinstance(request_id, str) or not request_id:
            raise Problem("invalid-request", f"request_id: expected a text field, got fields {list(form)}")
        if not isinstance(mask, UploadFile):
            raise Problem("invalid-request", f"mask: expected a PNG file field, got fields {list(form)}")
        return request_id, await mask.read()


@router.post(
    "/v1/feedback",
    summary="Ground truth (PNG of class ids, 255 = ignore) for a request served in the last minutes",
    responses={
        404: {"description": "Unknown or expired request id", "content": {PROBLEM_MEDIA_TYPE: {}}},
        409: {"description": "Feedback already given for this request", "content": {PROBLEM_MEDIA_TYPE: {}}},
        422: {
            "description": "Mask of the wrong size, mode or class ids",
            "content": {PROBLEM_MEDIA_TYPE: {}},
        },
    },
)
async def post_feedback(request: Request) -> JSONResponse:
    store: FeedbackStore | None = getattr(request.app.state, "feedback_store", None)
    telemetry: Telemetry | None = getattr(request.app.state, "telemetry", None)
    if store is None or telemetry is None:
        raise Problem("not-ready", "the service is starting: feedback is not accepted yet")
    settings: ServiceSettings = request.app.state.settings
    served_id, data = await _read_feedback(request, settings.max_body_bytes)
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
