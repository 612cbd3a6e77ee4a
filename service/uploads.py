"""Reading an uploaded image from a request: media type, byte limit, multipart.

The byte limit is checked twice: against ``Content-Length`` before reading anything, and while reading
(a chunked body or a lying header stops at the limit, not after it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.imaging import MEDIA_TYPES
from service.problems import Problem
from service.settings import ServiceSettings

MULTIPART = "multipart/form-data"
FILE_FIELD = "file"
ACCEPTED_MEDIA_TYPES = (*MEDIA_TYPES, MULTIPART)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class BodyLimits:
    """How much a request body may weigh and how slowly it may arrive (see ServiceSettings)."""

    max_bytes: int
    timeout_s: float = 60.0
    min_rate_bytes_s: float = 0.0
    min_rate_grace_s: float = 5.0

    def deadline(self, started: float, received: int) -> float:
        """The time by which the next chunk must arrive, given ``received`` bytes since ``started``."""
        deadline = started + self.timeout_s
        if self.min_rate_bytes_s > 0:
            # At least min_rate on average once the grace is over: the next byte is due when the bytes
            # so far stop covering it.
            deadline = min(deadline, started + self.min_rate_grace_s + received / self.min_rate_bytes_s)
        return deadline

    @classmethod
    def of(cls, settings: ServiceSettings) -> BodyLimits:
        return cls(
            settings.max_body_bytes,
            settings.body_timeout_s,
            settings.body_min_rate_bytes_s,
            settings.body_min_rate_grace_s,
        )


async def read_body(request: Request, limits: BodyLimits | int) -> bytes:
    """The whole body, under a byte limit (413) and the time limits of ``limits`` (408)."""
    if isinstance(limits, int):
        limits = BodyLimits(limits)
    limit = limits.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem("payload-too-large", f"expected a body of at most {limit} bytes, got {int(declared)}")
    chunks = []
    received = 0
    started = time.monotonic()
    while True:
        wait = limits.deadline(started, received) - time.monotonic()
        try:
            # A receive cancelled by the timeout loses nothing: uvicorn keeps the data for the next one.
            message = await asyncio.wait_for(request.receive(), timeout=max(wait, 0.0))
        except TimeoutError as exc:
            elapsed = time.monotonic() - started
            raise Problem(
                "request-timeout",
                f"expected the body within {limits.timeout_s:g} s and at {limits.min_rate_bytes_s:g} "
                f"bytes/s or more after {limits.min_rate_grace_s:g} s, got {received} bytes in {elapsed:.1f} s",
            ) from exc
        if message["type"] == "http.disconnect":
            # Nobody reads this answer; it only keeps a client's hang-up out of the error log.
            raise Problem("invalid-request", f"expected a complete body, got {received} bytes and a hang-up")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise Problem("payload-too-large", f"expected a body of at most {limit} bytes, got more")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    request._body = body  # later readers (none today) get the same bytes, not a second, empty stream
    return body


async def read_image_upload(request: Request, limits: BodyLimits | int) -> bytes:
    """The image bytes of a raw ``image/*`` body or of the ``file`` part of a multipart body."""
    kind = media_type(request)
    if kind not in ACCEPTED_MEDIA_TYPES:
        raise Problem(
            "unsupported-media-type",
            f"expected Content-Type one of {', '.join(ACCEPTED_MEDIA_TYPES)}, got {kind or 'none'!r}",
        )
    body = await read_body(request, limits)
    if kind != MULTIPART:
        return body
    return await _multipart_file(request, body)


@asynccontextmanager
async def multipart_form(request: Request, body: bytes, max_fields: int) -> AsyncIterator[FormData]:
    """The parsed multipart ``body`` (already read under the byte limit); its files close on exit."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=max_fields)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise Problem(
            "invalid-request", f"expected a well-formed multipart/form-data body, got: {exc.message}"
        ) from exc
    try:
        yield form
    finally:
        await form.close()


async def _multipart_file(request: Request, body: bytes) -> bytes:
    async with multipart_form(request, body, max_fields=16) as form:
        upload = form.get(FILE_FIELD)
        if not isinstance(upload, UploadFile):
            fields = list(form.keys())
            raise Problem(
                "invalid-request",
                f"expected a multipart file field {FILE_FIELD!r}, got fields {fields}",
                errors=[{"field": f"body.{FILE_FIELD}", "message": "missing file part"}],
            )
        return await upload.read()
