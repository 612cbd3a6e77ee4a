"""Live recalibration: the traffic sample (bounded, shared, opt-out), the recalibrate / shadow / activate /
rollback cycle through the API, and the serving choice that outlives a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import ADMIN_KEY, png_bytes, random_tables, scene, settings_for

from calibration.bundle import load_bundle
from calibration.traffic import decode_sample
from service.app import create_app
from service.inference import load_served_model
from service.recalibration.accumulator import TrafficAccumulator
from service.recalibration.choice import SERVING_FILE, ServingChoice, read_choice, write_choice
from service.recalibration.settings import RecalibrationSettings
from service.recalibration.shadow import shadow_stats
from service.records import SegmentationRecord
from service.registry import ModelRegistry
from service.state import MemoryStore

ADMIN = {"X-API-Key": ADMIN_KEY}
PNG = {"Content-Type": "image/png"}


def _registry(models_dir: Path) -> ModelRegistry:
    registry = ModelRegistry(models_dir, partial(load_served_model, threads=1, provider="cpu"))
    registry.load_all()
    return registry


def _record(version: str, seed: int, record: bool = True) -> SegmentationRecord:
    logits = np.random.default_rng(seed).normal(0, 2, (19, 6, 8)).astype(np.float32)
    decision = np.zeros((12, 16), np.uint8)
    return SegmentationRecord(
        request_id=f"r{seed}", model_name="tiny", model_version=version, raw_decision=decision,
        calibrated_decision=None, winning_logits=decision.astype(np.float32), logits=logits, tables=None,
        input_size=(12, 16), calibrate=False, tau=0.2, record=record,
    )  # fmt: skip


def test_traffic_is_bounded_by_the_ring_shared_by_workers_and_kept_apart_per_network(
    own_models_dir: Path,
) -> None:
    registry = _registry(own_models_dir)
    store = MemoryStore()
    settings = RecalibrationSettings(pixels_per_request=50, chunk_pixels=50, ring_slots=3)
    now = [0.0]
    workers = [TrafficAccumulator(store, registry, settings, clock=lambda: now[0], seed=k) for k in range(2)]
    network = {
        v: registry.get("tiny").versions[v].model.bundle.manifest.files["model.onnx"][:16] for v in "12"
    }  # type: ignore[union-attr]
    workers[0].observe(_record("2", 0))
    workers[1].observe(_record("2", 1))
    got = workers[0].read("tiny", network["2"], 19)
    assert (got.num_pixels, got.requests) == (100, 2)  # both workers' chunks
    for seed in range(2, 7):
        now[0] = float(seed)
        workers[seed % 2].observe(_record("2", seed))
    newest = workers[1].read("tiny", network["2"], 19)
    assert (newest.num_pixels, newest.first_s, newest.last_s) == (150, 4.0, 6.0)  # the 3 newest chunks only
    # tiny/1 is another network (other weights): its traffic is its own.
    assert workers[0].read("tiny", network["1"], 19).num_pixels == 0
    workers[0].observe(_record("1", 9))
    assert workers[0].read("tiny", network["1"], 19).num_pixels == 50


def test_opted_out_requests_and_a_disabled_sample_keep_nothing_and_buffers_flush(
    own_models_dir: Path,
) -> None:
    registry = _registry(own_models_dir)
    store = MemoryStore()
    network = registry.get("tiny").versions["2"].model.bundle.manifest.files["model.onnx"][:16]  # type: ignore[union-attr]
    on = TrafficAccumulator(store, registry, RecalibrationSettings(pixels_per_request=40, chunk_pixels=1000))
    on.observe(_record("2", 0, record=False))
    off = TrafficAccumulator(store, registry, RecalibrationSettings(accumulate=False))
    off.observe(_record("2", 1))
    off.flush()
    on.flush()
    assert on.read("tiny", network, 19).num_pixels == 0
    on.observe(_record("2", 2))
    assert on.read("tiny", network, 19).num_pixels == 0  # buffered below chunk_pixels
    on.flush()
    assert on.read("tiny", network, 19).num_pixels == 40


def test_serving_choice_round_trips_and_names_a_broken_file(tmp_path: Path) -> None:
    choice = ServingChoice(active="1", previous=None, shadow="2").activated("2", replaced="1")
    assert choice == ServingChoice(active="2", previous="1", shadow=None)
    assert (
        choice.activated("2", replaced="2") == choice
    )  # activating the served version: no new rollback target
    write_choice(tmp_path, "m", choice)
    assert read_choice(tmp_path, "m") == choice
    assert read_choice(tmp_path, "other") == ServingChoice()
    (tmp_path / "m" / SERVING_FILE).write_text('{"active": 3}')
    with pytest.raises(ValueError, match=r"m/serving\.json: expected versions as strings"):
        read_choice(tmp_path, "m")


def test_shadow_stats_match_a_per_pixel_loop() -> None:
    rng = np.random.default_rng(0)
    tables_a, tables_b = random_tables(1), random_tables(2)
    a = rng.integers(0, 19, (5, 7)).astype(np.uint8)
    b = np.where(rng.random((5, 7)) < 0.3, rng.integers(0, 19, (5, 7)), a).astype(np.uint8)
    za, zb = rng.normal(2, 2, (5, 7)).astype(np.float32), rng.normal(2, 2, (5, 7)).astype(np.float32)
    input_size = (11, 20)  # each decision pixel stands for 2-3 x 2-3 input pixels
    stats = shadow_stats((a, za, tables_a), (b, zb, tables_b), input_size)

    from calibration.segmentation import nearest_indices
    from calibration.tables import positive_quantile

    rows = np.bincount(nearest_indices(5, 11), minlength=5)
    cols = np.bincount(nearest_indices(7, 20), minlength=7)
    flipped = compared = 0
    pixels = {"a": np.zeros(19), "b": np.zeros(19)}
    sums = {"a": np.zeros(19), "b": np.zeros(19)}
    for i in range(5):
        for j in range(7):
            weight = rows[i] * cols[j]
            compared += weight
            flipped += weight * int(a[i, j] != b[i, j])
            for role, d, z, t in (("a", a, za, tables_a), ("b", b, zb, tables_b)):
                pixels[role][d[i, j]] += weight
                sums[role][d[i, j]] += weight * positive_quantile(z[i, j : j + 1], d[i, j : j + 1], t)[0]
    assert (stats.flipped, stats.compared) == (flipped, compared) == (stats.flipped, 11 * 20)
    np.testing.assert_array_equal(stats.active.pixels, pixels["a"])
    np.testing.assert_array_equal(stats.shadow.pixels, pixels["b"])
    np.testing.assert_allclose(stats.active.quantile_sums, sums["a"], rtol=1e-9)
    np.testing.assert_allclose(stats.shadow.quantile_sums, sums["b"], rtol=1e-9)
    np.testing.assert_allclose(stats.shadow.quantile_counts.sum(1), pixels["b"])


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Observers run on the worker pool after the response: wait for them (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {what} within {timeout_s} s")
        time.sleep(0.02)


def _traffic(client: TestClient) -> int:
    return decode_sample(client.get("/v1/models/tiny/traffic", headers=ADMIN).content).num_pixels


def _send(client: TestClient, count: int, **params: object) -> list[Any]:
    answers = []
    for seed in range(count):
        answer = client.post(
            "/v1/models/tiny/segment", content=png_bytes(scene(64, 96, seed)), headers=PNG, params=params
        )
        assert answer.status_code == 200, answer.text
        answers.append(answer)
    return answers


def test_recalibrate_shadow_activate_rollback_and_restart(
    own_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLDA_RECALIBRATION_PIXELS_PER_REQUEST", "3000")
    monkeypatch.setenv("BLDA_RECALIBRATION_CHUNK_PIXELS", "6000")
    monkeypatch.setenv("BLDA_RECALIBRATION_SHADOW_FRACTION", "1")
    settings = settings_for(own_models_dir)
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/models/tiny/recalibrate").status_code == 401
        _send(client, 2, record="false")
        sample = decode_sample(client.get("/v1/models/tiny/traffic", headers=ADMIN).content)
        assert sample.num_pixels == 0  # opted out
        thin = client.post("/v1/models/tiny/recalibrate", headers=ADMIN)
        assert thin.status_code == 409 and thin.json()["type"].endswith("not-enough-traffic")
        _send(client, 12)
        _until(lambda: _traffic(client) == 12 * 3000, "every request's pixels in the sample")
        answer = client.post("/v1/models/tiny/recalibrate", headers=ADMIN, params={"min_pixels": 1000})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["base_version"], body["candidate_version"]) == ("2", "3")
        assert (body["active_version"], body["pinned_version"]) == ("2", "2")  # the candidate does not serve
        rec = body["recalibration"]
        assert rec["requests"] == 12 and rec["pixels"] == 12 * 3000
        assert sum(rec["pixels_per_class"].values()) + rec["held_out_pixels"] == rec["pixels"]
        candidate = load_bundle(own_models_dir / "tiny" / "3")
        assert candidate.manifest.provenance.data["recalibration"]["base_version"] == "2"
        assert (
            candidate.manifest.files["model.onnx"]
            == load_bundle(own_models_dir / "tiny" / "2").manifest.files["model.onnx"]
        )
        assert candidate.tables is not None
        rows = [candidate.manifest.class_names.index(n) for n in rec["kept_current_rows"]]
        base_tables = load_bundle(own_models_dir / "tiny" / "2").tables
        assert base_tables is not None and rows
        np.testing.assert_array_equal(candidate.tables.target.means[rows], base_tables.target.means[rows])
        np.testing.assert_array_equal(candidate.tables.source.means, base_tables.source.means)

        shadowed_answers = _send(client, 2)  # served by 2, decided in shadow by 3

        def shadowed() -> list[dict[str, Any]]:
            return list(client.get("/v1/models/tiny/bias").json()["shadow"])

        _until(lambda: bool(shadowed()) and shadowed()[0]["requests"] == 2, "2 shadowed requests")
        shadow = shadowed()
        assert [(s["active"], s["shadow"], s["requests"]) for s in shadow] == [("2", "3", 2)]
        assert 0.0 < shadow[0]["flip_rate"] < 1.0  # other tables flip some pixels, not all
        metrics = client.get("/metrics").text
        assert (
            'blda_shadow_compared_pixels_total{model="tiny",shadow_version="3",version="2"} 12288.0'
            in metrics
        )
        assert 'role="shadow"' in metrics and 'role="active"' in metrics

        # Feedback whose truth is the served (active) mask: the active role scores IoU 1 on every class it
        # decided, the shadow role less where the two differ.
        served_png = shadowed_answers[-1]
        files = {"mask": ("mask.png", served_png.content, "image/png")}
        feedback = client.post(
            "/v1/feedback", data={"request_id": served_png.headers["x-request-id"]}, files=files
        )
        assert feedback.status_code == 200, feedback.text
        roles = shadowed()[0]["roles"]
        assert shadowed()[0]["feedback_images"] == 1
        assert roles["active"]["feedback_miou"] == 1.0
        assert roles["shadow"]["feedback_miou"] < 1.0
        assert "blda_shadow_feedback_correct_pixels_total" in client.get("/metrics").text

        assert (
            client.post("/v1/models/tiny/versions/3/activate", headers=ADMIN).json()["active_version"] == "3"
        )
        served = client.post("/v1/models/tiny/segment", content=png_bytes(scene(64, 96, 0)), headers=PNG)
        assert served.headers["x-model-version"] == "3"
        back = client.post("/v1/models/tiny/rollback", headers=ADMIN)
        assert back.status_code == 200 and back.json()["active_version"] == "2"
        assert client.post("/v1/models/tiny/rollback", headers=ADMIN).json()["active_version"] == "3"
        assert client.post("/v1/models/tiny/rollback", headers=ADMIN).json()["active_version"] == "2"
    assert json.loads((own_models_dir / "tiny" / SERVING_FILE).read_text()) == {
        "active": "2",
        "previous": "3",
        "shadow": None,
    }
    # A restart with the in-process state (the pins are gone): the file holds, though 3 is the highest.
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models/tiny").json()["active_version"] == "2"


def test_rollback_without_an_activation_is_a_409(own_models_dir: Path) -> None:
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        answer = client.post("/v1/models/tiny/rollback", headers=ADMIN)
        assert answer.status_code == 409 and answer.json()["type"].endswith("no-previous-version")
        assert client.post("/v1/models/plain/recalibrate", headers=ADMIN).status_code == 422
        assert client.post("/v1/models/nope/recalibrate", headers=ADMIN).status_code == 404
