"""Load and fault suite of a real `blda serve --workers 2` (issue 10): what a hostile but fair client can do.

    .venv/bin/python -m bench hardening              # 60 s of load, every fault kind
    .venv/bin/python -m bench hardening --quick      # 15 s of load (the table in service/README.md)

The shipped bundle (models/) is copied with a second version beside it; the server shares its state
through redis-server when one is on PATH (else the SQLite file `blda serve` creates). While 4 clients
post 256x512 PNGs, the admin API alternates the active version and reloads, and the fault kinds below
are sent; every answer is tallied. Prints one table: inputs tried and their outcomes, requests sent and
failed, reloads survived (answered 200 with every worker switched), peak memory of the process tree,
p50/p99 under load. "Failed" means a 5xx or a transport error on a well-formed request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench._server import free_port

REPO = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-admin-key"
PNG = {"content-type": "image/png"}


def image_bytes(seed: int, height: int = 256, width: int = 512) -> bytes:
    rng = np.random.default_rng(seed)
    x = np.mgrid[0:height, 0:width][1]
    rgb = np.stack([(x + 40 * c + rng.integers(0, 30, (height, width))) % 256 for c in range(3)], -1)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(c) for c in children.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def stage_models(root: Path) -> tuple[Path, str, list[str]]:
    """models/ copied, with a second version (same weights, manifest version changed)."""
    models = root / "models"
    shutil.copytree(REPO / "models", models)
    name = sorted(p.name for p in models.iterdir() if p.is_dir())[0]
    first = sorted(p for p in (models / name).iterdir() if p.is_dir())[-1]
    second = models / name / (first.name + "1")
    shutil.copytree(first, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["version"] = second.name
    (second / "manifest.json").write_text(json.dumps(manifest))
    return models, name, [first.name, second.name]


def raw_exchange(port: int, data: bytes, wait_s: float = 5.0) -> str:
    """Send raw bytes, return the status line (or what happened)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
            sock.sendall(data)
            answer = sock.recv(256)
    except OSError as exc:
        return f"closed ({type(exc).__name__})"
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] or "closed"


def faults(base: str, port: int, model: str) -> dict[str, Callable[[], str]]:
    """Each fault kind: a function sending one such input, returning its outcome."""
    good = image_bytes(1)

    def post(path: str, **kwargs: object) -> str:
        return str(httpx.post(base + path, timeout=30, **kwargs).status_code)  # type: ignore[arg-type]

    def slow_body() -> str:
        head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\nx"
        return raw_exchange(port, head, wait_s=15.0)

    def feedback_twice() -> str:
        served = httpx.post(base + "/v1/segment", content=good, headers=PNG, timeout=30)
        body = {
            "request_id": served.headers["x-request-id"],
            "mask": base64.b64encode(served.content).decode(),
        }
        first = httpx.post(base + "/v1/feedback", json=body, timeout=30).status_code
        second = httpx.post(base + "/v1/feedback", json=body, timeout=30).status_code
        return f"{first}+{second}"

    return {
        "junk bytes as image/png": lambda: post("/v1/segment", content=b"junk" * 100, headers=PNG),
        "truncated PNG": lambda: post("/v1/segment", content=good[: len(good) // 2], headers=PNG),
        "40000x40000 PNG header": lambda: post("/v1/segment", content=_png_header(40000, 40000), headers=PNG),
        "25 MB body": lambda: post("/v1/segment", content=b"\0" * (25 << 20), headers=PNG),
        "text/plain body": lambda: post("/v1/segment", content=b"x", headers={"content-type": "text/plain"}),
        "tau=5": lambda: post("/v1/segment?tau=5", content=good, headers=PNG),
        "model %2E%2E": lambda: post("/v1/models/%2E%2E/segment", content=good, headers=PNG),
        "reload %2E": lambda: post("/v1/models/%2E/reload", headers={"X-API-Key": ADMIN_KEY}),
        "100 KB header": lambda: str(
            httpx.get(base + "/healthz", headers={"X-Big": "y" * 100_000}).status_code
        ),
        "unfinished 1 MB header": lambda: raw_exchange(port, b"GET / HTTP/1.1\r\nX: " + b"y" * (1 << 20)),
        "slow body (1 byte, then silence)": slow_body,
        "feedback, then again": feedback_twice,
        "feedback for an unknown id": lambda: post(
            "/v1/feedback", params={"request_id": "nope"}, json={"mask": ""}
        ),
    }


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s of load instead of 60")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    duration = 15.0 if args.quick else 60.0

    root = Path(tempfile.mkdtemp(prefix="blda-bench-hardening-"))
    models, name, versions = stage_models(root)
    redis_binary = shutil.which("redis-server")
    redis = None
    env = {
        **os.environ,
        "BLDA_ADMIN_API_KEY": ADMIN_KEY,
        "BLDA_HEADER_TIMEOUT_S": "5",
        "BLDA_BODY_MIN_RATE_GRACE_S": "3",
    }
    if redis_binary:
        redis_port = free_port()
        redis = subprocess.Popen(
            [
                redis_binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        env["BLDA_STATE_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "blda", "serve", "--port", str(port), "--workers", "2", "--models-dir", str(models),
         "--no-access-log", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise SystemExit(f"server not ready; see {root / 'server.log'}")

        stop = threading.Event()
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        peak = [tree_rss_bytes(server.pid)]
        reloads = Counter[str]()
        images = [image_bytes(seed) for seed in range(8)]

        def client(index: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                i = index
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        status = str(http.post("/v1/segment", content=images[i % 8], headers=PNG).status_code)
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    latencies.append(time.perf_counter() - started)
                    statuses[status] += 1
                    i += 1

        def admin() -> None:
            corrupt = models / name / "9999"
            with httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": ADMIN_KEY}) as http:
                k = 0
                while not stop.wait(1.0):
                    if k % 3 == 2:  # a corrupt version appears on disk: the reload keeps serving
                        shutil.copytree(models / name / versions[0], corrupt, dirs_exist_ok=True)
                        (corrupt / "model.onnx").write_bytes(b"corrupt")
                        answer = http.post(f"/v1/models/{name}/reload")
                    else:
                        answer = http.post(f"/v1/models/{name}/versions/{versions[k % 2]}/activate")
                    ok = answer.status_code == 200 and answer.json()["sync"]["all_switched"]
                    reloads["survived" if ok else f"failed {answer.status_code}"] += 1
                    k += 1

        def sample_memory() -> None:
            while not stop.wait(0.2):
                peak[0] = max(peak[0], tree_rss_bytes(server.pid))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads += [threading.Thread(target=admin), threading.Thread(target=sample_memory)]
        for thread in threads:
            thread.start()
        outcomes: dict[str, Counter[str]] = {}
        kinds = faults(base, port, name)
        fault_deadline = time.monotonic() + duration
        rounds = 0
        while time.monotonic() < fault_deadline:
            for kind, send in kinds.items():
                try:
                    outcome = send()
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                outcomes.setdefault(kind, Counter())[outcome] += 1
            rounds += 1
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)

    sent = sum(statuses.values())
    failed = sum(n for s, n in statuses.items() if not s.isdigit() or s.startswith("5"))
    p50, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 99))
    print(f"\n`blda serve --workers 2`, state: {'redis' if redis else 'sqlite'}, {args.clients} clients, "
          f"{duration:g} s, {os.cpu_count()} cores; {rounds} rounds of faults\n")  # fmt: skip
    print("| input | tries | outcomes (status: count) |\n| --- | --- | --- |")
    for kind, counts in outcomes.items():
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(f"| {kind} | {sum(counts.values())} | {shown} |")
    print("\n| figure | value |\n| --- | --- |")
    print(f"| segment requests under load, sent / failed | {sent} / {failed} |")
    print(f"| their statuses | {', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))} |")
    survived = reloads["survived"]
    print(
        f"| admin changes (activate, reload with a corrupt version on disk) survived | {survived} / {sum(reloads.values())} |"
    )
    print(f"| p50 / p99 under load | {p50:.0f} / {p99:.0f} ms |")
    print(f"| peak memory (server process tree, RSS) | {peak[0] / 2**20:.0f} MiB |")
    print(f"| server alive at the end | {'yes' if alive else 'no'} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
