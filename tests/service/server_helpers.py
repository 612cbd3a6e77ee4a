"""Real `blda serve` processes on 127.0.0.1 for the tests: start, wait until ready, stop; free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from service_helpers import ADMIN_KEY

REPO = Path(__file__).resolve().parents[2]
MAX_BODY = 300_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    models_dir: Path, port: int, workers: int = 1, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "blda", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--workers",
        str(workers),
        "--models-dir",
        str(models_dir),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    environment = {
        **os.environ,
        "BLDA_ADMIN_API_KEY": ADMIN_KEY,
        "BLDA_DEFAULT_MODEL": "tiny",
        "BLDA_INTRA_OP_THREADS": "1",
        "BLDA_MAX_BODY_BYTES": str(MAX_BODY),
        **(env or {}),
    }
    return subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_ready(process: subprocess.Popen[bytes], base: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"server exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready within {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate(timeout=10)
    return output.decode()


def require_binary(name: str) -> str:
    """Path of a server binary; skips without it, except on CI (CI=true) where .ci/run installs it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian: apt-get install {name})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away redis-server on 127.0.0.1 (no persistence); yields its redis:// URL."""
    binary = require_binary("redis-server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer on port {port} within 15 s")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
