"""Shared state: the store contract (memory, SQLite, Redis), and feedback through any worker or replica."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_helpers import free_port, redis_server, start_server, stop, wait_ready
from service_helpers import png_bytes, scene

from service.state import MemoryStore, RedisStore, SqliteStore, StateStore, open_store

PNG = {"content-type": "image/png"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "memory":
        made: StateStore = MemoryStore()
    elif request.param == "sqlite":
        made = SqliteStore(tmp_path / "state.db")
    else:
        made = RedisStore(request.getfixturevalue("redis_url"))
        made._redis.flushdb()  # type: ignore[attr-defined]
    yield made
    made.close()


def test_the_store_contract(store: StateStore) -> None:
    assert store.get("k") is None and store.take("k") is None
    store.put("k", b"v1")
    store.put("k", b"v2")
    assert store.get("k") == b"v2"
    assert store.take("k") == b"v2" and store.get("k") is None and store.take("k") is None
    assert [store.incr("n") for _ in range(3)] == [1, 2, 3] and store.incr("n", 10) == 13
    assert store.get("n") == b"13"  # a counter reads as its digits, as Redis has it


def test_of_concurrent_takers_exactly_one_wins(store: StateStore) -> None:
    for round_ in range(5):
        store.put(f"prize{round_}", b"x")
        barrier = threading.Barrier(8)

        def take(_: int, key: str = f"prize{round_}", barrier: threading.Barrier = barrier) -> bytes | None:
            barrier.wait(timeout=10)
            return store.take(key)

        with ThreadPoolExecutor(8) as pool:
            won = [r for r in pool.map(take, range(8)) if r is not None]
        assert won == [b"x"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: store.incr("c"), range(200)))
    assert store.incr("c", 0) == 200


def test_values_expire_after_their_ttl() -> None:
    clock = Clock()
    memory = MemoryStore(clock=clock)
    memory.put("k", b"v", ttl_s=10)
    clock.now += 9.9
    assert memory.get("k") == b"v"
    clock.now += 0.2
    assert memory.get("k") is None and memory.take("k") is None


def test_sqlite_and_redis_expire_too(tmp_path: Path, redis_url: str) -> None:
    clock = Clock()
    sqlite = SqliteStore(tmp_path / "s.db", clock=clock)
    sqlite.put("k", b"v", ttl_s=10)
    clock.now += 10.1
    assert sqlite.get("k") is None and sqlite.take("k") is None
    redis = RedisStore(redis_url)
    redis.put("short", b"v", ttl_s=0.05)
    assert redis._redis.pttl("short") > 0  # type: ignore[attr-defined]


def test_open_store_names_what_it_expected(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store(f"sqlite:///{tmp_path}/x.db"), SqliteStore)
    with pytest.raises(RuntimeError, match="expected a memory://"):
        open_store("ftp://x")
    with pytest.raises(RuntimeError, match="redis"):
        open_store(f"redis://127.0.0.1:{free_port()}/0")


# --- Feedback through the real server ---------------------------------------------------------------


def segment_then_feedback(segment_base: str, feedback_base: str, seed: int) -> tuple[int, int]:
    """Segment on one fresh connection, send the served mask back as truth on another, at once."""
    image = png_bytes(scene(32, 40, seed=seed))
    with httpx.Client(base_url=segment_base, timeout=30.0) as http:
        served = http.post("/v1/segment", content=image, headers={**PNG, "X-Request-Id": "same-for-all"})
    assert served.status_code == 200, served.text
    request_id = served.headers["x-request-id"]
    with httpx.Client(base_url=feedback_base, timeout=30.0) as http:
        body = {"request_id": request_id, "mask": base64.b64encode(served.content).decode()}
        answer = http.post("/v1/feedback", json=body)
        again = http.post("/v1/feedback", params={"request_id": request_id}, json=body)
    assert answer.status_code != 200 or answer.json()["pixel_accuracy"]["raw"] is not None
    return answer.status_code, again.status_code


@pytest.mark.e2e
def test_feedback_right_after_the_response_with_one_worker(models_dir: Path) -> None:
    """The prediction is stored before the response: an immediate feedback never gets 404. A client id
    reused by every request keys nothing: each request has its own server id."""
    port = free_port()
    process = start_server(models_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        with ThreadPoolExecutor(4) as pool:  # a little load, as when 100% once failed
            results = list(pool.map(lambda seed: segment_then_feedback(base, base, seed), range(24)))
        assert results == [(200, 409)] * 24
    finally:
        stop(process)


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["sqlite (default)", "redis"])
def test_feedback_through_another_worker(
    models_dir: Path, store: str, request: pytest.FixtureRequest
) -> None:
    env = {"BLDA_STATE_URL": request.getfixturevalue("redis_url")} if store == "redis" else {}
    port = free_port()
    process = start_server(models_dir, port, workers=2, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, timeout_s=120)
        # Each call opens new connections: the kernel spreads them over both workers.
        results = [segment_then_feedback(base, base, seed) for seed in range(16)]
        assert results == [(200, 409)] * 16
    finally:
        stop(process)


@pytest.mark.e2e
def test_feedback_through_another_replica(models_dir: Path, redis_url: str) -> None:
    env = {"BLDA_STATE_URL": redis_url}
    ports = [free_port(), free_port()]
    processes = [start_server(models_dir, port, env=env) for port in ports]
    a, b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for process, base in zip(processes, (a, b), strict=True):
            wait_ready(process, base)
        assert [segment_then_feedback(a, b, seed) for seed in range(6)] == [(200, 409)] * 6
        assert [segment_then_feedback(b, a, seed) for seed in range(6)] == [(200, 409)] * 6
        # A replica that never served it refuses an unknown id the same way.
        with httpx.Client(base_url=b, timeout=10.0) as http:
            unknown = http.post("/v1/feedback", params={"request_id": "nope"}, json={"mask": ""})
        assert unknown.status_code == 404
    finally:
        for process in processes:
            stop(process)


def test_the_prediction_is_stored_before_the_response_is_sent(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when storing is slow (a remote store under load), the response waits for it."""
    from fastapi.testclient import TestClient
    from service_helpers import settings_for

    from service.app import create_app
    from service.feedback import FeedbackStore

    put = FeedbackStore.put

    def slow_put(self: FeedbackStore, prediction: object) -> None:
        time.sleep(0.3)
        put(self, prediction)  # type: ignore[arg-type]

    monkeypatch.setattr(FeedbackStore, "put", slow_put)
    with TestClient(create_app(settings_for(models_dir))) as client:
        served = client.post("/v1/segment", content=png_bytes(scene(32, 40)), headers=PNG)
        body = {
            "request_id": served.headers["x-request-id"],
            "mask": base64.b64encode(served.content).decode(),
        }
        assert client.post("/v1/feedback", json=body).status_code == 200


def test_predictions_round_trip_through_the_shared_format() -> None:
    from service.feedback import ServedPrediction, compress_mask, deserialize_prediction, serialize_prediction

    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for calibrated in (compress_mask(mask[::-1]), None):
        p = ServedPrediction("r", "m", "1.0", 19, (12, 16), (3, 4), compress_mask(mask), calibrated, 5.0)
        assert deserialize_prediction(serialize_prediction(p)) == p


@pytest.mark.e2e
def test_a_redis_outage_keeps_segmentation_up_and_feedback_says_why(models_dir: Path) -> None:
    from server_helpers import redis_server

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with redis_server() as url:
        process = start_server(models_dir, port, env={"BLDA_STATE_URL": url})
        try:
            wait_ready(process, base)
            assert segment_then_feedback(base, base, 0) == (200, 409)
        except BaseException:
            stop(process)
            raise
    # redis-server is gone now.
    try:
        with httpx.Client(base_url=base, timeout=30.0) as http:
            served = http.post("/v1/segment", content=png_bytes(scene(16, 16)), headers=PNG)
            assert served.status_code == 200, served.text
            body = {
                "request_id": served.headers["x-request-id"],
                "mask": base64.b64encode(served.content).decode(),
            }
            answer = http.post("/v1/feedback", json=body)
            assert answer.status_code == 503 and answer.json()["type"] == "/problems/state-unavailable"
            assert answer.headers["retry-after"] == "5"
    finally:
        stop(process)
