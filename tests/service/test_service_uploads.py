"""Reading request bodies: the byte limit while streaming, and a client hanging up mid-body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from starlette.requests import Request

from service.problems import Problem
from service.uploads import BodyLimits, read_body, read_image_upload


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


def trickle(every_s: float, chunk: bytes = b"x") -> Request:
    """A body arriving as ``chunk`` every ``every_s`` seconds, for ever."""

    async def receive() -> dict[str, object]:
        await asyncio.sleep(every_s)
        return {"type": "http.request", "body": chunk, "more_body": True}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_a_body_must_arrive_within_the_total_deadline() -> None:
    limits = BodyLimits(max_bytes=10**9, timeout_s=0.3, min_rate_bytes_s=0.0)
    started = time.monotonic()
    with pytest.raises(Problem) as caught:
        asyncio.run(read_body(trickle(0.01, b"x" * 100), limits))  # fast enough, but never ends
    assert caught.value.status == 408 and caught.value.slug == "request-timeout"
    assert 0.3 <= time.monotonic() - started < 1.0
    assert "within 0.3 s" in caught.value.detail


def test_a_body_slower_than_the_minimum_rate_is_cut_after_the_grace() -> None:
    limits = BodyLimits(max_bytes=10**9, timeout_s=60.0, min_rate_bytes_s=100.0, min_rate_grace_s=0.2)
    started = time.monotonic()
    with pytest.raises(Problem) as caught:
        asyncio.run(read_body(trickle(0.05), limits))  # 20 B/s
    assert caught.value.status == 408
    assert time.monotonic() - started < 1.0  # not the 60 s total


def test_the_deadline_grows_with_what_arrived() -> None:
    limits = BodyLimits(max_bytes=1, timeout_s=60.0, min_rate_bytes_s=1000.0, min_rate_grace_s=5.0)
    assert limits.deadline(100.0, 0) == 105.0
    assert limits.deadline(100.0, 10_000) == 115.0
    assert limits.deadline(100.0, 10**9) == 160.0  # the total deadline caps it
    assert BodyLimits(1, timeout_s=7.0).deadline(0.0, 0) == 7.0  # no minimum rate
