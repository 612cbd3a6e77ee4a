"""`blda serve` as a benchmark's subprocess on 127.0.0.1: a free port, a bounded wait for /readyz, a stop
that cannot hang. Shared by the service, drift and hardening benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`blda serve --models-dir DIR [options]` on a free port; its output goes to ``log`` (appended) or to
    a temporary file. ``env`` is added to this process's environment. Use as a context manager, or call
    :meth:`wait_ready` and :meth:`stop`."""

    def __init__(
        self,
        models_dir: Path,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        log: Path | None = None,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self._log_path = log
        self._log: IO[bytes] = open(log, "ab") if log is not None else tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        command = [sys.executable, "-m", "blda", "serve", "--port", str(self.port),
                   "--models-dir", str(models_dir), *options]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT
        )

    def fail(self, why: str) -> SystemExit:
        if self._log_path is not None:
            return SystemExit(f"{why}; see {self._log_path}")
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace")[-3000:]
        return SystemExit(f"{why}; server output:\n{tail}")

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.fail(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        error = self.fail(f"the server was not ready within {self.ready_timeout_s:g} s")
        self.stop()
        raise error

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
