"""Timeouts and limits of the real server (`blda serve` on 127.0.0.1): slow and huge heads, slow bodies,
admission that slow senders cannot take, feedback's bounds, and a shutdown that a slow upload cannot hold.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_helpers import free_port, start_server, stop, wait_ready
from service_helpers import png_bytes, scene

pytestmark = pytest.mark.e2e

PNG = {"content-type": "image/png"}
IMAGE = png_bytes(scene(40, 48, seed=3))
# Short limits, so that each test waits a few seconds at most.
LIMITS = {
    "BLDA_MAX_PENDING_REQUESTS": "4",
    "BLDA_MAX_UPLOADS_IN_TRANSIT": "48",
    "BLDA_HEADER_TIMEOUT_S": "2",
    "BLDA_MAX_HEADER_BYTES": "16384",
    "BLDA_BODY_MIN_RATE_BYTES_S": "1000",
    "BLDA_BODY_MIN_RATE_GRACE_S": "3",
    "BLDA_BODY_TIMEOUT_S": "20",
    "BLDA_GRACEFUL_SHUTDOWN_S": "2",
    "BLDA_KEEP_ALIVE_S": "1",
}


def open_upload(
    port: int, path: str = "/v1/segment", kind: str = "image/png", length: int = 200_000, first: bytes = b"x"
) -> socket.socket:
    """A connection that sent a complete head announcing ``length`` bytes of ``kind``, and ``first`` of them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + first)
    return sock


def read_answer(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """One HTTP response (head and Content-Length body) from a raw socket."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within ``seconds``, what it sent before)."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[int]:
    port = free_port()
    process = start_server(models_dir, port, env=LIMITS)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}")
        yield port
    finally:
        stop(process)


def test_slow_senders_do_not_starve_normal_requests(limited: int) -> None:
    """32 connections trickling bodies at 1 byte/s hold no admission slot (there are 4): others get served."""
    slow = [open_upload(limited) for _ in range(32)]
    stop_trickle = threading.Event()

    def trickle() -> None:
        while not stop_trickle.wait(1.0):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"x")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(1.0)  # every slow body is in transit
        base = f"http://127.0.0.1:{limited}"
        started = time.monotonic()
        with httpx.Client(base_url=base, timeout=10.0) as http, ThreadPoolExecutor(4) as pool:
            ready = http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["load"]["uploads_in_transit"] == 32
            answers = list(pool.map(lambda _: http.post("/v1/segment", content=IMAGE, headers=PNG), range(8)))
        assert [a.status_code for a in answers] == [200] * 8, [
            a.text for a in answers if a.status_code != 200
        ]
        assert time.monotonic() - started < 8.0
        # And the slow senders are cut off by the minimum rate (1000 B/s after a 3 s grace) with a 408.
        closed, answer = closed_within(slow[0], 6.0)
        assert closed and answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request-timeout" in answer and b"connection: close" in answer.lower()
    finally:
        stop_trickle.set()
        trickler.join(timeout=5)
        for sock in slow:
            sock.close()


def test_a_slow_head_is_cut_off_after_the_header_timeout(limited: int) -> None:
    sock = socket.create_connection(("127.0.0.1", limited), timeout=10)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        for i in range(8):  # one header line a second: the head never completes
            time.sleep(0.5)
            try:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
            except OSError:
                break
        closed, _ = closed_within(sock, 3.0)
        assert closed and time.monotonic() - started < 6.0
    finally:
        sock.close()


def test_an_idle_connection_is_closed_after_the_header_timeout(limited: int) -> None:
    with socket.create_connection(("127.0.0.1", limited), timeout=10) as sock:
        closed, got = closed_within(sock, 5.0)
        assert closed and got == b""


def test_an_idle_keep_alive_connection_closes_after_the_keep_alive(limited: int) -> None:
    with socket.create_connection(("127.0.0.1", limited), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        closed, _ = closed_within(sock, 4.0)
        # 1 s of keep-alive, well before the 2 s header timeout could be the reason.
        assert closed and time.monotonic() - started < 1.8


def test_a_head_over_the_size_limit_is_refused(limited: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{limited}", timeout=10.0) as http:
        assert http.get("/healthz", headers={"X-Big": "y" * 8000}).status_code == 200
        response = http.get("/healthz", headers={"X-Big": "y" * 100_000})
        assert response.status_code == 431 and response.json()["type"] == "/problems/header-too-large"


def test_an_unfinished_head_over_the_size_limit_is_dropped(limited: int) -> None:
    """10 x 30 MB of unfinished header once added 389 MiB: now each stops at the 16 KiB limit."""
    with socket.create_connection(("127.0.0.1", limited), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        try:
            while sent < 4_000_000:
                sock.sendall(b"y" * 65536)
                sent += 65536
        except OSError:
            pass  # reset by the server: what this test wants
        closed, answer = closed_within(sock, 5.0)
        assert (closed and sent < 4_000_000) or answer.startswith(b"HTTP/1.1 400"), (sent, answer[:100])


def test_feedback_for_an_unknown_id_is_refused_before_the_mask_is_read(limited: int) -> None:
    sock = socket.create_connection(("127.0.0.1", limited), timeout=10)
    try:
        head = (
            "POST /v1/feedback?request_id=never-served HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
        )
        sock.sendall(head.encode())  # and no body at all
        answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
        assert b"request-not-found" in answer
    finally:
        sock.close()


def test_feedback_bodies_share_the_uploads_budget(models_dir: Path) -> None:
    port = free_port()
    process = start_server(models_dir, port, env={**LIMITS, "BLDA_MAX_UPLOADS_IN_TRANSIT": "3"})
    base = f"http://127.0.0.1:{port}"
    held: list[socket.socket] = []
    try:
        wait_ready(process, base)
        held = [open_upload(port, "/v1/feedback", "application/json", first=b"{") for _ in range(3)]
        time.sleep(0.5)
        with httpx.Client(base_url=base, timeout=10.0) as http:
            refused = http.post("/v1/feedback", json={"request_id": "x", "mask": ""})
            assert refused.status_code == 503 and refused.json()["type"] == "/problems/overloaded"
            assert refused.headers["retry-after"] == "1"
            assert http.get("/readyz").status_code == 503  # the probe says so too
            segment = http.post("/v1/segment", content=IMAGE, headers=PNG)
            assert segment.status_code == 503
            for sock in held:
                sock.close()
            held = []
            deadline = time.monotonic() + 5
            while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert http.post("/v1/segment", content=IMAGE, headers=PNG).status_code == 200
    finally:
        for sock in held:
            sock.close()
        stop(process)


def test_sigterm_with_a_slow_upload_exits_within_the_grace(models_dir: Path) -> None:
    port = free_port()
    # No minimum rate: only the graceful-shutdown limit (2 s) can end this upload.
    env = {**LIMITS, "BLDA_BODY_MIN_RATE_BYTES_S": "0", "BLDA_BODY_TIMEOUT_S": "600"}
    process = start_server(models_dir, port, env=env)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}")
        sock = open_upload(port)
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=12)
        except Exception:
            pytest.fail("the server was still waiting for the slow upload 12 s after SIGTERM")
        assert time.monotonic() - started < 2 + 3.0
        sock.close()
    finally:
        if process.poll() is None:
            process.kill()
        stop(process)
