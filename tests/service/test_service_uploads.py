"""Reading request bodies: the byte limit while streaming, and a client hanging up mid-body."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from starlette.requests import Request

from service.problems import Problem
from service.uploads import read_body, read_image_upload


def request(messages: list[dict[str, object]], headers: dict[str, str] | None = None) -> Request:
    feed: Iterator[dict[str, object]] = iter(messages)

    async def receive() -> dict[str, object]:
        return next(feed)

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw_headers}, receive)


def chunks(*parts: bytes) -> list[dict[str, object]]:
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


def test_body_within_the_limit_is_joined() -> None:
    assert asyncio.run(read_body(request(chunks(b"ab", b"cd", b"e")), 5)) == b"abcde"


def test_limit_applies_while_streaming_without_content_length() -> None:
    with pytest.raises(Problem) as caught:
        asyncio.run(read_body(request(chunks(b"abc", b"def", b"never read")), 5))
    assert caught.value.status == 413 and caught.value.slug == "payload-too-large"


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(Problem) as caught:
        asyncio.run(read_body(request([], {"Content-Length": "6"}), 5))
    assert caught.value.status == 413 and "got 6" in caught.value.detail


def test_a_hang_up_mid_body_is_a_client_problem() -> None:
    messages: list[dict[str, object]] = [*chunks(b"abc", b"def")[:1], {"type": "http.disconnect"}]
    with pytest.raises(Problem) as caught:
        asyncio.run(read_body(request(messages), 100))
    assert caught.value.slug == "invalid-request" and "hang-up" in caught.value.detail


@pytest.mark.parametrize("content_type", ["image/PNG", "image/png; charset=binary", "IMAGE/JPEG"])
def test_media_types_are_case_and_parameter_insensitive(content_type: str) -> None:
    body = asyncio.run(read_image_upload(request(chunks(b"xyz"), {"Content-Type": content_type}), 100))
    assert body == b"xyz"
