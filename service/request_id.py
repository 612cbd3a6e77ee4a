"""A request id on every request (``request.state.request_id``) and response (``X-Request-Id``).

The id is always the server's own (a fresh UUID): it keys the served prediction that feedback refers
to, so a client must not be able to choose it (two clients reusing one id would overwrite each other's
prediction). A client's own ``X-Request-Id``, when short and plain, is kept only for correlation: it
comes back as ``X-Client-Request-Id`` and is logged beside the server's id.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
CLIENT_HEADER = "X-Client-Request-Id"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_ACCEPTABLE = re.compile(REQUEST_ID_PATTERN)


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_request_id(client_value: str | None) -> str | None:
    """The client's correlation id when it is short and plain, else None (never echoed unchecked)."""
    if client_value is not None and _ACCEPTABLE.match(client_value):
        return client_value
    return None


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
        request_id = new_request_id()
        correlation = client_request_id(client_value)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = correlation

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = request_id
                if correlation is not None:
                    headers[CLIENT_HEADER] = correlation
            await send(message)

        await self.app(scope, receive, send_with_id)
