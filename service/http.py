"""The HTTP server's own limits: uvicorn's options from the settings, and an h11 protocol with a header timeout.

uvicorn bounds idle keep-alive connections and the graceful shutdown, and (h11 only) the bytes of an
incomplete request head, but has no deadline for the request head itself: a client sending one header
byte a second holds a connection, and its buffer, for ever. :class:`GuardedH11Protocol` closes a
connection whose request line and headers have not all arrived ``header_timeout_s`` after the first
byte of them (or after the connection opened). The body's deadlines are the app's
(:func:`service.uploads.read_body`), where the request is known.

httptools (uvicorn's default parser when installed) has no head size limit, so the service always runs h11.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from service.problems import problem_response
from service.settings import ServiceSettings, load_settings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request head (``BLDA_HEADER_TIMEOUT_S``)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Read in each worker process: the settings come from the environment `blda serve` prepared.
        self.header_timeout_s = _header_timeout_s()
        self._head_timer: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # The first byte of a new request head starts its deadline (an idle keep-alive connection is
        # uvicorn's timeout_keep_alive's business until then).
        if self._awaiting_head():
            self._arm()
        super().data_received(data)
        if not self._awaiting_head():
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()
        if not self._awaiting_head():  # a pipelined request already started
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()


_HEADER_TIMEOUT_S: float | None = None


def _header_timeout_s() -> float:
    global _HEADER_TIMEOUT_S
    if _HEADER_TIMEOUT_S is None:
        _HEADER_TIMEOUT_S = load_settings().header_timeout_s
    return _HEADER_TIMEOUT_S


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` that bound connections, from the settings."""
    return {
        "http": GuardedH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
    }


class HeadLimitMiddleware:
    """431 for a request head over ``max_header_bytes`` that arrived whole.

    h11 refuses (400) a head still incomplete past the limit, which bounds what a client can make the
    server buffer; a head that arrives in one read is parsed before h11 looks, so its size is checked here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(key) + len(value) + 4 for key, value in scope["headers"])
            if size > self.max_bytes:
                response = problem_response(
                    "header-too-large",
                    f"expected a request line and headers of at most {self.max_bytes} bytes, got {size}",
                    scope.get("state", {}).get("request_id"),
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
