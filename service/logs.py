"""Optional structured logs (``BLDA_LOG_FORMAT=json``): JSON lines, and one line per request.

Each request line carries the server's request id (and the client's correlation id), method, route
template, status, duration, and for segmentations the model, version and stage times (read from the
response's own headers, so the routes need not know about logging)::

    {"ts": "...", "level": "INFO", "logger": "blda.access", "msg": "request", "request_id": "9f...",
     "method": "POST", "route": "/v1/segment", "status": 200, "duration_ms": 31.2, "model": "tiny",
     "version": "2", "stages_ms": {"decode": 1.2, "infer": 20.1, "calibrate": 3.3, "encode": 2.0}}
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS = logging.getLogger("blda.access")
_FIELDS = ("request_id", "client_request_id", "method", "route", "status", "duration_ms", "model", "version")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in (*_FIELDS, "stages_ms"):
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def configure_json_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for every logger (uvicorn's included: they propagate to the root)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # blda.access replaces it


def parse_server_timing(value: str) -> dict[str, float]:
    """``decode;dur=1.20, infer;dur=20.10`` -> {"decode": 1.2, "infer": 20.1}."""
    stages = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";dur=")
        try:
            stages[name] = float(rest)
        except ValueError:
            continue
    return stages


class AccessLogMiddleware:
    """One ``blda.access`` line per HTTP request, with the fields above as record attributes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = int(message["status"])
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])
                }
                seen["model"] = headers.get("x-model-name")
                seen["version"] = headers.get("x-model-version")
                timing = headers.get("server-timing")
                seen["stages_ms"] = parse_server_timing(timing) if timing else None
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = scope.get("state", {})
            ACCESS.info(
                "request",
                extra={
                    "request_id": state.get("request_id"),
                    "client_request_id": state.get("client_request_id"),
                    "method": scope.get("method"),
                    "route": getattr(scope.get("route"), "path", None) or "unmatched",
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    **seen,
                },
            )
