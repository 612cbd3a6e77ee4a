"""``POST /v1/models/{name}/segment`` and ``POST /v1/segment`` (the default model).

Stages (service.pipeline, shared with `blda predict`): decode (bytes -> model input), infer
(onnxruntime), calibrate (logits upsampled bilinearly to the decision size, then the argmax and the core's
calibrated rule on them), encode (nearest resize of the decision to the image, PNG or JSON). Each runs off
the event loop; their wall times go to ``Server-Timing``.

JSON masks are run-length encoded over the row-major flattened mask (see :class:`RleMask`)::

    mask = np.repeat(values, lengths).reshape(height, width)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from service.admission import upload_slot, work_slot
from service.dependencies import ObserversDep, RegistryDep, RunnerDep, SettingsDep, problem_from
from service.feedback import FeedbackStore
from service.imaging import ImageDecodeError, ImageTooLargeError
from service.inference import InferenceRunner, ServedModel
from service.names import NAME_PATTERN, ModelNameParam
from service.pipeline import (
    CalibratorError,
    Decision,
    SegmentOptions,
    decide_for,
    decode,
    encode,
    options_from,
    resolve_calibration,
)
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.records import SegmentationObserver, SegmentationRecord, StageTimings
from service.registry import ModelRegistry, NotReady, RegistryError, VersionNotFound, VersionNotLoadable
from service.uploads import ACCEPTED_MEDIA_TYPES, FILE_FIELD, MULTIPART, BodyLimits, read_image_upload

log = logging.getLogger(__name__)

router = APIRouter(tags=["segmentation"])

# The largest tau accepted from a client (the paper serves with 0.2; past 1 the shift dominates the logits).
TAU_MAX = 1.0


class RleMask(BaseModel):
    encoding: Literal["rle-row-major"] = "rle-row-major"
    size: tuple[int, int] = Field(description="(height, width) of the mask: the input image's size")
    values: list[int] = Field(description="class id of each run")
    lengths: list[int] = Field(description="pixels in each run; they sum to height * width")


class SegmentationJson(BaseModel):
    request_id: str
    model: str
    version: str
    calibrated: bool
    calibrator: str = Field(description="the calibrator of the served decision (none: the raw argmax)")
    tau: float | None = Field(description="tau used when calibrated, else null")
    classes: list[str] = Field(description="class names by id")
    class_counts: dict[str, int] = Field(description="pixels per class name in the mask")
    decision_size: tuple[int, int] = Field(
        description="(height, width) the decision was made at (upsampled logits), before the nearest resize"
    )
    raw_class_counts: dict[str, int] = Field(
        description="pixels per class name in the raw (uncalibrated) decision; equal to class_counts "
        "when calibration did not run"
    )
    changed_pixels: int | None = Field(
        description="pixels (at the image's size) whose class calibration changed; null when it did not run"
    )
    mask: RleMask = Field(description="the served mask: calibrated when calibration ran, else raw")
    raw_mask: RleMask | None = Field(
        default=None, description="the raw decision's mask, only with raw_mask=true"
    )


_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {FILE_FIELD: _IMAGE_SCHEMA},
                    "required": [FILE_FIELD],
                }
            },
            **{kind: {"schema": _IMAGE_SCHEMA} for kind in ("image/png", "image/jpeg", "image/webp")},
        },
    }
}
_PROBLEM: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The mask at the input's size: a palette PNG (pixel value = class id), or JSON.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/SegmentationJson"}},
        },
        "headers": {
            "X-Request-Id": {"schema": {"type": "string"}},
            "X-Model-Version": {"schema": {"type": "string"}},
            "X-Calibrated": {"schema": {"type": "string", "enum": ["true", "false"]}},
            "X-Image-Size": {"schema": {"type": "string"}, "description": "HxW of the image"},
            "X-Mask-Size": {"schema": {"type": "string"}, "description": "HxW of the returned mask"},
            "X-Calibrator": {
                "schema": {"type": "string"},
                "description": "the calibrator of the served decision (none: the raw argmax)",
            },
            "Server-Timing": {
                "schema": {"type": "string"},
                "description": "decode, infer, calibrate, encode (ms)",
            },
        },
    },
    404: {"description": "Unknown model or version", **_PROBLEM},
    408: {"description": "The body did not arrive in time (deadline, minimum rate)", **_PROBLEM},
    413: {"description": "Body over the byte limit", **_PROBLEM},
    415: {"description": "Unsupported media type", **_PROBLEM},
    422: {"description": "Undecodable or oversized image, or a bad query value", **_PROBLEM},
    431: {"description": "Request line and headers over the byte limit", **_PROBLEM},
    503: {"description": "No model loaded, or too many requests in progress (Retry-After)", **_PROBLEM},
}

CalibrateQuery = Annotated[
    bool | None, Query(description="apply the BLDA calibrated decision; default from the model's manifest")
]
CalibratorQuery = Annotated[
    str | None,
    Query(
        max_length=32,
        description="the bundle's calibrator for the served decision (`GET /v1/models/{name}` lists them: "
        "none, logit-adjust, em-prior, bcts, bcts-em, blda, blda+em-prior); default from the manifest",
    ),
]
TauQuery = Annotated[
    float | None, Query(ge=0.0, le=TAU_MAX, description="calibration strength; default from the manifest")
]
FormatQuery = Annotated[
    Literal["png", "json"],
    Query(description="png: palette mask; json: class counts of both decisions, changed pixels, RLE mask"),
]
VersionQuery = Annotated[
    str | None,
    Query(
        pattern=NAME_PATTERN,
        description="a loaded version of the model (`GET /v1/models/{name}`); default: its active version",
    ),
]
RawMaskQuery = Annotated[
    bool,
    Query(
        description="format=json only: also return the raw decision's mask (`raw_mask`), so that both "
        "decisions of one request can be compared"
    ),
]
RecordQuery = Annotated[
    bool,
    Query(description="false: keep no pixel of this request for live recalibration (the traffic sample)"),
]


MaskSizeQuery = Annotated[
    Literal["image", "decision"],
    Query(
        description="image: the mask at the image's size; decision: at the decision size (the model's "
        "input x decision_scale, `X-Mask-Size`), for clients that resize it themselves: the cheapest "
        "response (a 1024x2048 PNG mask costs ~4 ms to encode, its 256x512 decision ~0.3 ms)"
    ),
]


@dataclass(frozen=True)
class SegmentQuery:
    """The query of both segment routes, as one dependency (FastAPI reads the fields as query parameters)."""

    calibrate: CalibrateQuery = None
    calibrator: CalibratorQuery = None
    tau: TauQuery = None
    format: FormatQuery = "png"
    raw_mask: RawMaskQuery = False
    version: VersionQuery = None
    record: RecordQuery = True
    mask_size: MaskSizeQuery = "image"


SegmentQueryDep = Annotated[SegmentQuery, Depends()]


@dataclass(frozen=True)
class _Done:
    size: tuple[int, int]  # (H, W) of the uploaded image
    logits: np.ndarray  # (C, h, w)
    decision: Decision
    body: bytes
    timings: StageTimings


def _finish(job: _Job, size: tuple[int, int], logits: np.ndarray) -> tuple[Decision, bytes, float, float]:
    started = time.perf_counter()
    decision = decide_for(job.model, logits, size, job.opts)
    decided = time.perf_counter()
    body = encode(job.model, decision, size, job.opts)
    return decision, body, decided - started, time.perf_counter() - decided


@dataclass(frozen=True)
class _Job:
    model: ServedModel
    opts: SegmentOptions


def _decode(job: _Job, data: bytes) -> tuple[tuple[int, int], np.ndarray]:
    return decode(job.model, data, job.opts.max_pixels, job.opts.scaled_decode)


def _whole(job: _Job, data: bytes, runner: InferenceRunner, queued_at: float) -> _Done:
    """Every stage in one worker thread: one hand-off per request instead of one per stage."""
    size, image = _decode(job, data)
    decoded = time.perf_counter()
    logits = runner.run_inference(job.model, image)[0]  # (C, h, w)
    inferred = time.perf_counter()
    decision, body, calibrate_s, encode_s = _finish(job, size, logits)
    timings = StageTimings(decoded - queued_at, inferred - decoded, calibrate_s, encode_s)
    return _Done(size, logits, decision, body, timings)


async def _staged(job: _Job, data: bytes, runner: InferenceRunner) -> _Done:
    """Stages as separate hand-offs, so that inference can join a micro-batch."""
    started = time.perf_counter()
    size, image = await runner.in_thread(_decode, job, data)
    decoded = time.perf_counter()
    logits = (await runner.infer(job.model, image))[0]
    inferred = time.perf_counter()
    decision, body, calibrate_s, encode_s = await runner.in_thread(_finish, job, size, logits)
    return _Done(
        size,
        logits,
        decision,
        body,
        StageTimings(decoded - started, inferred - decoded, calibrate_s, encode_s),
    )


def _mask_size(done: _Done, mask_size: str) -> str:
    height, width = done.size if mask_size == "image" else done.decision.served.shape
    return f"{height}x{width}"


async def _dispatch(
    runner: InferenceRunner, observers: Sequence[SegmentationObserver], record: SegmentationRecord
) -> None:
    runner.cpu_pool.submit(_notify, observers, record)


def _notify(observers: Sequence[SegmentationObserver], record: SegmentationRecord) -> None:
    for observer in observers:
        try:
            observer(record)
        except Exception:  # an observer must never fail or slow down serving
            log.exception("segmentation observer %r failed (request id %s)", observer, record.request_id)


def _serving(registry: ModelRegistry, name: str | None, version: str | None) -> ServedModel:
    """The active version of ``name`` (default: the default model), or the loaded ``version`` of it."""
    if version is None:
        return registry.serving(name)
    if name is None:
        name = registry.default_name
        if name is None:
            raise NotReady("no model found in the models directory")
    state = registry.get(name)
    target = state.versions.get(version)
    if target is None:
        raise VersionNotFound(
            f"expected one of the versions {list(state.versions)} of {name}, got {version!r}"
        )
    if target.model is None:
        raise VersionNotLoadable(f"{name}/{version} failed to load: {target.error}")
    return target.model


async def _segment(
    request: Request,
    name: str | None,
    query: SegmentQuery,
    registry: RegistryDep,
    runner: RunnerDep,
    settings: SettingsDep,
    observers: ObserversDep,
) -> Response:
    calibrate, calibrator, tau, version = query.calibrate, query.calibrator, query.tau, query.version
    output, raw_mask, mask_size = query.format, query.raw_mask, query.mask_size
    try:
        model = _serving(registry, name, version)
    except RegistryError as exc:
        raise problem_from(exc) from exc
    if calibrate and not model.has_calibration and calibrator is None:
        raise Problem("calibration-unavailable", f"{model.name}/{model.version} has no calibration tables")
    try:
        choice = resolve_calibration(model, calibrate, calibrator, tau)
    except CalibratorError as exc:
        raise Problem("invalid-calibrator", str(exc)) from exc
    use_calibration, tau_used, chosen = choice.calibrate, choice.tau, choice.calibrator
    request_id: str = request.state.request_id
    head = {"request_id": request_id, "model": model.name, "version": model.version, **choice.head()}
    opts = replace(
        options_from(settings, use_calibration, tau_used, output, raw_mask, head, chosen), mask_at=mask_size
    )
    job = _Job(model=model, opts=opts)

    with upload_slot(runner, settings):
        data = await read_image_upload(request, BodyLimits.of(settings))
    # The work slot only now that the body is in: slow senders cannot hold it (service.admission).
    with work_slot(runner, settings):
        try:
            if runner.batching:
                done = await _staged(job, data, runner)
            else:
                done = await runner.in_thread(_whole, job, data, runner, time.perf_counter())
        except ImageTooLargeError as exc:
            raise Problem("image-too-large", str(exc)) from exc
        except ImageDecodeError as exc:
            raise Problem("invalid-image", str(exc)) from exc
    done.logits.setflags(write=False)
    timings = done.timings
    media = "image/png" if output == "png" else "application/json"
    headers = {
        "X-Model-Name": model.name,
        "X-Model-Version": model.version,
        "X-Calibrated": "true" if use_calibration else "false",
        "X-Calibrator": chosen,
        "Server-Timing": timings.server_timing(),
        "X-Image-Size": f"{done.size[0]}x{done.size[1]}",
        "X-Mask-Size": _mask_size(done, mask_size),
    }
    if use_calibration and choice.uses_tau:
        headers["X-Calibration-Tau"] = f"{tau_used:g}"
    background = None
    store: FeedbackStore | None = getattr(request.app.state, "feedback_store", None)
    if observers or store is not None:
        record = SegmentationRecord(
            request_id=request_id,
            model_name=model.name,
            model_version=model.version,
            raw_decision=done.decision.raw,
            calibrated_decision=done.decision.calibrated,
            winning_logits=done.decision.winning_logits,
            calibrated_logits=done.decision.calibrated_logits,
            logits=done.logits,
            tables=model.bundle.tables,
            input_size=done.size,
            calibrate=use_calibration,
            tau=tau_used,
            timings=timings,
            record=query.record,
            calibrator=chosen,
        )
        if store is not None:
            # Before the response: a feedback sent the moment the client has it must find it.
            try:
                await runner.in_thread(store.observe, record)
            except Exception:  # feedback is secondary: the segmentation is still answered
                log.exception("storing the prediction for feedback failed (request id %s)", request_id)
        if observers:
            # Handed to the worker pool once the response is sent (a background task runs after the last
            # body message), and not awaited: observers delay neither this response nor the next request.
            background = BackgroundTask(_dispatch, runner, tuple(observers), record)
    return Response(content=done.body, media_type=media, headers=headers, background=background)


_DOC = (
    "Segment an image. Body: `multipart/form-data` with a `file` part, or a raw `image/png`, `image/jpeg` or "
    "`image/webp`. Returns a palette PNG mask at the image's size (pixel value = class id), or with "
    "`format=json` the class counts and a run-length encoded mask (`np.repeat(values, lengths)` row-major), "
    "the raw decision's class counts and the pixels calibration changed (and with `raw_mask=true` the raw "
    "mask too). Decisions are made on logits upsampled bilinearly to the model's input size times "
    "`decision_scale` (a setting), at most the image's size, then resized to the image by nearest neighbour. "
    f"Accepted Content-Types: {', '.join(ACCEPTED_MEDIA_TYPES)}."
)


@router.post(
    "/v1/models/{name}/segment",
    summary="Segment an image with a named model",
    description=_DOC,
    openapi_extra=_REQUEST_BODY,
    responses=_RESPONSES,
    response_class=Response,
)
async def segment_with_model(
    request: Request,
    name: ModelNameParam,
    registry: RegistryDep,
    runner: RunnerDep,
    settings: SettingsDep,
    observers: ObserversDep,
    query: SegmentQueryDep,
) -> Response:
    return await _segment(
        request,
        name,
        query,
        registry,
        runner,
        settings,
        observers,
    )


@router.post(
    "/v1/segment",
    summary="Segment an image with the default model",
    description=_DOC,
    openapi_extra=_REQUEST_BODY,
    responses=_RESPONSES,
    response_class=Response,
)
async def segment_with_default(
    request: Request,
    registry: RegistryDep,
    runner: RunnerDep,
    settings: SettingsDep,
    observers: ObserversDep,
    query: SegmentQueryDep,
) -> Response:
    return await _segment(
        request,
        None,
        query,
        registry,
        runner,
        settings,
        observers,
    )
