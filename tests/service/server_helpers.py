"""Real `blda serve` processes on 127.0.0.1 for the tests: start, wait until ready, stop; free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
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
