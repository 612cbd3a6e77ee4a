"""Errors as RFC 9457 problem details: ``application/problem+json`` with a stable ``type`` per kind.

Routes and services raise :class:`Problem`; the handlers installed by :func:`install_problem_handlers`
turn it, FastAPI's validation errors and Starlette's HTTP errors into the same JSON shape::

    {"type": "/problems/image-too-large", "title": "Image too large", "status": 422,
     "detail": "expected at most 16777216 pixels, got 40000 x 40000 = 1600000000", "request_id": "..."}

The ``type`` URIs are relative references into this service: ``GET /problems/{slug}`` describes each.
Clients should branch on ``type``, never on ``detail`` (a message for people).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.state import StateError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "/problems/"


@dataclass(frozen=True)
class ProblemType:
    status: int
    title: str
    description: str


# slug -> what the problem means. The slugs are part of the API: never rename one.
PROBLEM_TYPES: dict[str, ProblemType] = {
    "payload-too-large": ProblemType(413, "Payload too large", "The request body exceeds the byte limit."),
    "unsupported-media-type": ProblemType(
        415,
        "Unsupported media type",
        "The body must be multipart/form-data with a 'file' part, or a raw image/png, image/jpeg or "
        "image/webp.",
    ),
    "request-timeout": ProblemType(
        408,
        "Request timeout",
        "The request body did not arrive in time (a total deadline and a minimum rate); the connection closes.",
    ),
    "header-too-large": ProblemType(
        431, "Request header fields too large", "The request line and headers exceed the byte limit."
    ),
    "invalid-image": ProblemType(422, "Invalid image", "The image cannot be decoded as PNG, JPEG or WebP."),
    "image-too-large": ProblemType(
        422, "Image too large", "The image has more pixels than the service accepts."
    ),
    "invalid-request": ProblemType(
        422, "Invalid request", "A query parameter, header or body field is invalid."
    ),
    "calibration-unavailable": ProblemType(
        422,
        "Calibration unavailable",
        "Calibration was requested but the model version has no calibration tables.",
    ),
    "invalid-calibrator": ProblemType(
        422,
        "Invalid calibrator",
        "The calibrator asked for is not among the model version's, or contradicts `calibrate`.",
    ),
    "model-not-found": ProblemType(404, "Model not found", "No model of that name is loaded or on disk."),
    "version-not-found": ProblemType(404, "Version not found", "The model has no version of that name."),
    "version-not-loadable": ProblemType(
        409, "Version not loadable", "The version exists but failed to load; see /v1/models/{name} for why."
    ),
    "not-found": ProblemType(404, "Not found", "No resource at this path."),
    "method-not-allowed": ProblemType(405, "Method not allowed", "The path does not accept this method."),
    "unauthorized": ProblemType(401, "Unauthorized", "The admin endpoints need an X-API-Key header."),
    "forbidden": ProblemType(
        403, "Forbidden", "The X-API-Key header does not match the configured admin key."
    ),
    "admin-disabled": ProblemType(
        403, "Admin disabled", "No admin key is configured (BLDA_ADMIN_API_KEY), so admin endpoints are off."
    ),
    "not-enough-traffic": ProblemType(
        409, "Not enough traffic", "Too few pixels of served traffic were sampled to refit the tables."
    ),
    "no-previous-version": ProblemType(
        409, "No previous version", "No activation was recorded to roll back."
    ),
    "not-ready": ProblemType(503, "Not ready", "No model version is loaded and serving yet."),
    "overloaded": ProblemType(
        503, "Overloaded", "Too many segment requests are in progress; retry after the Retry-After seconds."
    ),
    "state-unavailable": ProblemType(
        503, "State unavailable", "The shared state store (BLDA_STATE_URL) cannot be reached; retry later."
    ),
    "internal-error": ProblemType(
        500, "Internal error", "An unexpected server error; the request id is logged."
    ),
}

_STATUS_FALLBACK = {
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
}


# What a client must never see: absolute file paths (the server's layout) and object reprs (heap
# addresses, e.g. PIL's "<_io.BytesIO object at 0x7f...>").
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?!/(?:v1|problems)/)(?:/[\w.+@~-]+){2,}/?")  # not this API's own


def redact(text: str, root: str | None = None) -> str:
    """``text`` without absolute paths (relative to ``root`` when below it, else the last component) or
    object reprs (their type name)."""
    if root:
        text = text.replace(root.rstrip("/") + "/", "")
    text = _OBJECT_REPR.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


class Problem(Exception):
    """An error answered as problem details; ``slug`` picks the type (and status and title)."""

    def __init__(self, slug: str, detail: str, **extensions: Any) -> None:
        if slug not in PROBLEM_TYPES:
            raise KeyError(f"unknown problem type {slug!r}; expected one of {sorted(PROBLEM_TYPES)}")
        super().__init__(detail)
        self.slug = slug
        self.detail = detail
        self.extensions = extensions

    @property
    def status(self) -> int:
        return PROBLEM_TYPES[self.slug].status


def problem_body(slug: str, detail: str, request_id: str | None = None, **extensions: Any) -> dict[str, Any]:
    kind = PROBLEM_TYPES[slug]
    public = redact(detail)
    if public != detail:  # the full text stays in the server's log, findable by the request id
        log.info("problem %s (request id %s): %s", slug, request_id, detail)
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug,
        "title": kind.title,
        "status": kind.status,
        "detail": public,
    }
    if request_id:
        body["request_id"] = request_id
    body.update(extensions)
    return body


def problem_response(
    slug: str,
    detail: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body = problem_body(slug, detail, request_id, **extensions)
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    headers = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'} if exc.status == 401 else None
    if exc.slug == "overloaded":
        headers = {"Retry-After": "1"}
    if exc.slug == "request-timeout":
        # The rest of the body may still be on its way: this connection cannot carry another request.
        headers = {"Connection": "close"}
    return problem_response(exc.slug, exc.detail, _request_id(request), headers=headers, **exc.extensions)


def _describe_validation_error(error: dict[str, Any]) -> dict[str, Any]:
    where = ".".join(str(part) for part in error.get("loc", ()))
    return {"field": where, "message": error.get("msg", ""), "input": error.get("input")}


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_describe_validation_error(e) for e in exc.errors()]
    # Inputs are echoed for the client's benefit, but only when they are short scalars.
    for error in errors:
        value = error.pop("input")
        if isinstance(value, str | int | float | bool) and len(str(value)) <= 100:
            error["got"] = value
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return problem_response("invalid-request", detail, _request_id(request), errors=errors)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    slug = _STATUS_FALLBACK.get(exc.status_code)
    if slug is None:
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
        }
        return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_MEDIA_TYPE, headers=headers)
    return problem_response(slug, str(exc.detail), _request_id(request), headers=headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = _request_id(request)
    log.exception(
        "unhandled error (request id %s, client id %s)",
        request_id,
        getattr(request.state, "client_request_id", None),
    )
    # This handler runs outside the request-id middleware: set its header here.
    headers = {"X-Request-Id": request_id} if request_id else {}
    correlation = getattr(request.state, "client_request_id", None)
    if correlation:
        headers["X-Client-Request-Id"] = correlation
    return problem_response(
        "internal-error", "an unexpected error occurred; quote the request id", request_id, headers=headers
    )


async def _on_state_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("shared state unavailable (request id %s): %s", _request_id(request), exc)
    return problem_response(
        "state-unavailable",
        "the shared state store cannot be reached",
        _request_id(request),
        headers={"Retry-After": "5"},
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StateError, _on_state_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
