"""Reading an uploaded image from a request: media type, byte limit, multipart.

The byte limit is checked twice: against ``Content-Length`` before reading anything, and while reading
(a chunked body or a lying header stops at the limit, not after it).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.imaging import MEDIA_TYPES
from service.problems import Problem

MULTIPART = "multipart/form-data"
FILE_FIELD = "file"
ACCEPTED_MEDIA_TYPES = (*MEDIA_TYPES, MULTIPART)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem("payload-too-large", f"expected a body of at most {limit} bytes, got {int(declared)}")
    chunks = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Problem("payload-too-large", f"expected a body of at most {limit} bytes, got more")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        # Nobody reads this answer; it only keeps a client's hang-up out of the error log.
        raise Problem(
            "invalid-request", f"expected a complete body, got {received} bytes and a hang-up"
        ) from exc
    return b"".join(chunks)


async def read_image_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a raw ``image/*`` body or of the ``file`` part of a multipart body."""
    kind = media_type(request)
    if kind not in ACCEPTED_MEDIA_TYPES:
        raise Problem(
            "unsupported-media-type",
            f"expected Content-Type one of {', '.join(ACCEPTED_MEDIA_TYPES)}, got {kind or 'none'!r}",
        )
    body = await read_body(request, limit)
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
