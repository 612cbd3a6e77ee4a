"""Models, versions, reload and activation through the HTTP stack; admin authentication; readiness."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import ADMIN_KEY, BundleFactory, png_bytes, scene, settings_for

from service.app import create_app
from service.settings import load_settings

PNG = {"content-type": "image/png"}
ADMIN = {"X-API-Key": ADMIN_KEY}
IMAGE = png_bytes(scene(48, 64, seed=9))


def segment(client: TestClient, model: str = "tiny") -> tuple[str, np.ndarray]:
    response = client.post(f"/v1/models/{model}/segment?calibrate=false", content=IMAGE, headers=PNG)
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"], np.asarray(Image.open(io.BytesIO(response.content)))


def versions(client: TestClient, name: str = "tiny") -> dict[str, dict[str, object]]:
    return {v["version"]: v for v in client.get(f"/v1/models/{name}").json()["versions"]}


def corrupt_model_file(bundle: Path, keep_checksum: bool) -> None:
    """Replace model.onnx by junk; with keep_checksum the manifest is updated so only onnxruntime objects."""
    junk = b"not an onnx model" * 10
    (bundle / "model.onnx").write_bytes(junk)
    if keep_checksum:
        import hashlib

        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = hashlib.sha256(junk).hexdigest()
        (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_models_listing(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()}
    assert set(models) == {"plain", "tiny"}
    tiny = models["tiny"]
    assert tiny["default"] is True and models["plain"]["default"] is False
    assert tiny["active_version"] == "2" and [v["version"] for v in tiny["versions"]] == ["1", "2"]
    assert all(
        v["status"] == "ready" and v["providers"] == ["CPUExecutionProvider"] for v in tiny["versions"]
    )
    assert tiny["versions"][1]["calibration"]["available"] is True
    assert models["plain"]["versions"][0]["calibration"]["available"] is False
    detail = client.get("/v1/models/tiny").json()
    assert len(detail["classes"]) == 19 and detail["output"] == {
        "name": "logits",
        "num_classes": 19,
        "stride": 4,
    }
    assert detail["provenance"]["trained"] is False
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["type"] == "/problems/model-not-found"


def test_broken_bundles_at_start_are_reported_and_skipped(
    own_models_dir: Path, make_bundle: BundleFactory
) -> None:
    corrupt_model_file(make_bundle(own_models_dir, "tiny", "3", seed=3), keep_checksum=False)
    broken_manifest = make_bundle(own_models_dir, "tiny", "4", seed=4)
    (broken_manifest / "manifest.json").write_text("{not json")
    renamed = make_bundle(own_models_dir, "tiny", "5", seed=5)
    renamed.rename(own_models_dir / "tiny" / "6")  # manifest says 5, directory says 6
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        listed = versions(client)
        assert {v: s["status"] for v, s in listed.items()} == {
            "1": "ready",
            "2": "ready",
            "3": "failed",
            "4": "failed",
            "6": "failed",
        }
        assert "model.onnx: sha256: expected" in str(listed["3"]["error"])
        assert "manifest.json" in str(listed["4"]["error"]) and "expected JSON" in str(listed["4"]["error"])
        assert "version: expected tiny/6" in str(listed["6"]["error"])
        assert segment(client)[0] == "2"


@pytest.mark.parametrize("keep_checksum", [False, True], ids=["checksum-mismatch", "onnx-unloadable"])
def test_reload_to_a_corrupted_bundle_keeps_the_old_version_serving(
    own_models_dir: Path, make_bundle: BundleFactory, keep_checksum: bool
) -> None:
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        version, before = segment(client)
        assert version == "2"
        # A new version that is corrupted: reported, not activated.
        corrupt_model_file(make_bundle(own_models_dir, "tiny", "3", seed=3), keep_checksum)
        response = client.post("/v1/models/tiny/reload", headers=ADMIN)
        assert response.status_code == 200
        assert response.json()["active_version"] == "2"
        failed = versions(client)["3"]
        assert failed["status"] == "failed" and failed["error"]
        version, mask = segment(client)
        assert version == "2" and np.array_equal(mask, before)
        # The serving version itself corrupted on disk: the copy in memory keeps serving.
        corrupt_model_file(own_models_dir / "tiny" / "2", keep_checksum)
        assert client.post("/v1/models/tiny/reload", headers=ADMIN).status_code == 200
        stale = versions(client)["2"]
        assert stale["status"] == "stale" and stale["active"] is True and stale["error"]
        version, after = segment(client)
        assert version == "2" and np.array_equal(after, before)
        ready = client.get("/readyz")
        assert ready.status_code == 200


def test_reload_picks_up_a_new_version_and_a_new_model(
    own_models_dir: Path, make_bundle: BundleFactory
) -> None:
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        make_bundle(own_models_dir, "tiny", "10", seed=7)  # natural order: 10 > 2
        assert client.post("/v1/models/tiny/reload", headers=ADMIN).json()["active_version"] == "10"
        assert segment(client)[0] == "10"
        make_bundle(own_models_dir, "fresh", "1", seed=8)
        assert client.post("/v1/models/fresh/reload", headers=ADMIN).status_code == 200
        assert segment(client, "fresh")[0] == "1"
        unknown = client.post("/v1/models/ghost/reload", headers=ADMIN)
        assert unknown.status_code == 404 and unknown.json()["type"] == "/problems/model-not-found"


def test_activation_pins_a_version_across_reloads(own_models_dir: Path, make_bundle: BundleFactory) -> None:
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        _, mask_two = segment(client)
        response = client.post("/v1/models/tiny/versions/1/activate", headers=ADMIN)
        assert response.status_code == 200
        assert response.json()["active_version"] == "1" and response.json()["pinned_version"] == "1"
        version, mask_one = segment(client)
        assert version == "1" and not np.array_equal(mask_one, mask_two)  # other weights, other mask
        make_bundle(own_models_dir, "tiny", "3", seed=3)
        assert client.post("/v1/models/tiny/reload", headers=ADMIN).json()["active_version"] == "1"
        assert segment(client)[0] == "1"
        assert client.post("/v1/models/tiny/versions/3/activate", headers=ADMIN).status_code == 200
        assert segment(client)[0] == "3"

        missing = client.post("/v1/models/tiny/versions/9/activate", headers=ADMIN)
        assert missing.status_code == 404 and missing.json()["type"] == "/problems/version-not-found"
        corrupt_model_file(make_bundle(own_models_dir, "tiny", "4", seed=4), keep_checksum=False)
        client.post("/v1/models/tiny/reload", headers=ADMIN)
        broken = client.post("/v1/models/tiny/versions/4/activate", headers=ADMIN)
        assert broken.status_code == 409 and broken.json()["type"] == "/problems/version-not-loadable"
        unknown = client.post("/v1/models/ghost/versions/1/activate", headers=ADMIN)
        assert unknown.status_code == 404
        assert segment(client)[0] == "3"


def test_settings_pin_a_version(models_dir: Path) -> None:
    with TestClient(create_app(settings_for(models_dir, pinned_versions={"tiny": "1"}))) as client:
        assert segment(client)[0] == "1"
        assert client.get("/v1/models/tiny").json()["active_version"] == "1"


@pytest.mark.parametrize(
    ("headers", "status", "slug"),
    [
        ({}, 401, "unauthorized"),
        ({"X-API-Key": "wrong"}, 403, "forbidden"),
        ({"X-API-Key": ""}, 401, "unauthorized"),
    ],
)
def test_admin_needs_the_key(client: TestClient, headers: dict[str, str], status: int, slug: str) -> None:
    for path in ("/v1/models/tiny/reload", "/v1/models/tiny/versions/1/activate"):
        response = client.post(path, headers=headers)
        assert response.status_code == status
        assert response.json()["type"] == f"/problems/{slug}"
        if status == 401:
            assert response.headers["www-authenticate"].startswith("ApiKey")
    assert client.get("/v1/models/tiny").json()["active_version"] == "2"  # nothing changed


@pytest.mark.parametrize("key", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_admin_is_disabled_without_a_configured_key(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    if key is not None:  # as an env file with `BLDA_ADMIN_API_KEY=` gives it
        monkeypatch.setenv("BLDA_ADMIN_API_KEY", key)
    settings = load_settings(models_dir=models_dir, **({} if key is not None else {"admin_api_key": None}))
    assert settings.admin_api_key is None
    with TestClient(create_app(settings)) as client:
        for sent in ({"X-API-Key": "anything"}, {"X-API-Key": ""}, {}):
            response = client.post("/v1/models/tiny/reload", headers=sent)
            assert response.status_code == 403 and response.json()["type"] == "/problems/admin-disabled"


def test_not_ready_until_a_bundle_loads(tmp_path: Path, make_bundle: BundleFactory) -> None:
    root = tmp_path / "models"
    root.mkdir()
    with TestClient(create_app(settings_for(root))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["type"] == "/problems/not-ready"
        response = client.post("/v1/segment", content=IMAGE, headers=PNG)
        assert response.status_code == 503 and response.json()["type"] == "/problems/not-ready"
        make_bundle(root, "tiny", "1")
        assert client.post("/v1/models/tiny/reload", headers=ADMIN).status_code == 200
        assert client.get("/readyz").json()["status"] == "ready"
        assert segment(client)[0] == "1"


def test_requests_keep_succeeding_during_reloads(own_models_dir: Path, make_bundle: BundleFactory) -> None:
    with TestClient(create_app(settings_for(own_models_dir))) as client:

        def post(_: int) -> str:
            return segment(client)[0]

        def reload(step: int) -> int:
            if step == 1:
                make_bundle(own_models_dir, "tiny", "3", seed=3)
            if step == 3:
                shutil.rmtree(own_models_dir / "tiny" / "3")
            return client.post("/v1/models/tiny/reload", headers=ADMIN).status_code

        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(post, range(24)))
            statuses = [reload(step) for step in range(5)]
            served += list(pool.map(post, range(8)))
        assert set(statuses) == {200}
        assert set(served) <= {"2", "3"}
        assert segment(client)[0] == "2"  # version 3 left the disk


def test_a_model_whose_directory_is_gone_keeps_serving_and_says_so(own_models_dir: Path) -> None:
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        _, before = segment(client)
        shutil.rmtree(own_models_dir / "tiny")
        assert client.post("/v1/models/tiny/reload", headers=ADMIN).status_code == 200
        listed = versions(client)
        assert list(listed) == ["2"] and listed["2"]["status"] == "stale"
        assert "it is gone" in str(listed["2"]["error"])
        version, after = segment(client)
        assert version == "2" and np.array_equal(after, before)


def test_the_default_model_is_explicit_or_the_first_present(
    tmp_path: Path, make_bundle: BundleFactory
) -> None:
    """Without default_model in the settings: the only model, then the first present (earliest created),
    not the one whose name sorts first, also after a restart; /v1/models says which and why."""
    root = tmp_path / "models"
    zebra = make_bundle(root, "zebra", "1")
    manifest_path = zebra / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["provenance"]["created"] = "2020-01-01T00:00:00+00:00"  # bundled long before the next model
    manifest_path.write_text(json.dumps(raw))
    with TestClient(create_app(settings_for(root, default_model=None))) as client:
        (only,) = client.get("/v1/models").json()
        assert only["default"] is True and only["default_reason"].startswith("the only model")
        make_bundle(root, "aardvark", "1", calibrated=False)
        assert client.post("/v1/models/aardvark/reload", headers=ADMIN).status_code == 200
        models = {m["name"]: m for m in client.get("/v1/models").json()}
        assert models["zebra"]["default"] is True and models["aardvark"]["default"] is False
        assert models["zebra"]["default_reason"].startswith("the first model present")
        assert models["aardvark"]["default_reason"] is None
        assert client.get("/readyz").json()["default_model"] == "zebra"
    with TestClient(create_app(settings_for(root, default_model=None))) as client:  # a restart
        assert client.get("/readyz").json()["default_model"] == "zebra"
    with TestClient(create_app(settings_for(root, default_model="aardvark"))) as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()}
        assert models["aardvark"]["default_reason"] == "set by default_model in the settings"
