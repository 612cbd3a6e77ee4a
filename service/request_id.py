"""A request id on every request (``request.state.request_id``) and response (``X-Request-Id``).

A client's own ``X-Request-Id`` is kept when it is short and plain, so ids can be traced across
services; otherwise a fresh one is made.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_ACCEPTABLE = re.compile(REQUEST_ID_PATTERN)


def new_request_id(client_value: str | None) -> str:
    if client_value is not None and _ACCEPTABLE.match(client_value):
        return client_value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it does not buffer or re-wrap streaming bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_value = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                client_value = value.decode("latin-1")
                break
        request_id = new_request_id(client_value)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
