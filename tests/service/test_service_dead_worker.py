"""A killed worker's live gauges (in-flight requests) are removed: they do not inflate the sum for good."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from server_helpers import free_port, start_server, stop, wait_ready

pytestmark = pytest.mark.e2e


def in_flight_by_pid(directory: Path) -> dict[int, float]:
    found = {}
    for path in directory.glob("gauge_livesum_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[0] == "blda_http_requests_in_flight":
                found[pid] = found.get(pid, 0.0) + value
    return found


def scraped_in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}, timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("blda_http_requests_in_flight "))
    return float(line.split()[1])


def test_a_killed_workers_in_flight_gauge_is_removed(models_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    port = free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "BLDA_BODY_MIN_RATE_BYTES_S": "0"}
    process = start_server(models_dir, port, workers=2, env=env)
    base = f"http://127.0.0.1:{port}"
    held: list[socket.socket] = []
    try:
        wait_ready(process, base, timeout_s=120)
        head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 9999\r\n\r\nx"
        deadline = time.monotonic() + 20
        victim = None
        while victim is None and time.monotonic() < deadline:  # slow uploads until one worker holds some
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head)
            held.append(sock)
            time.sleep(0.1)
            busy = {pid: n for pid, n in in_flight_by_pid(directory).items() if n > 0}
            victim = next(iter(busy), None)
        assert victim is not None, "no worker took an upload"
        os.kill(victim, signal.SIGKILL)
        for sock in held:
            sock.close()
        held = []
        # uvicorn restarts the worker; the dead one's gauges are gone by the next scrape, so only the
        # scrape itself is in flight.
        deadline = time.monotonic() + 30
        while True:
            try:
                value = scraped_in_flight(base)
            except httpx.TransportError:
                value = -1.0
            if value == 1.0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert value == 1.0, f"in flight: {value}, files: {sorted(p.name for p in directory.iterdir())}"
        assert victim not in in_flight_by_pid(directory)
    finally:
        for sock in held:
            sock.close()
        stop(process)
