"""Model names and versions: one pattern, checked before any filesystem access, on every route."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import ADMIN_KEY, BundleFactory, png_bytes, scene, settings_for

from service.app import create_app
from service.registry import BadName, ModelRegistry
from service.settings import ServiceSettings

ADMIN = {"X-API-Key": ADMIN_KEY}
PNG = {"content-type": "image/png"}
# As they reach the route: "%2E" is decoded to "." before matching, "%2F" stays one path segment.
BAD = ["%2E", "%2E%2E", ".hidden", "-rf", "a%20b", "..%2F..", "%2E%2E%2Fmodels"]


@pytest.fixture
def admin_client(own_models_dir: Path, make_bundle: BundleFactory) -> TestClient:
    # A directory beside the models folder: what `..` once listed, with absolute paths.
    make_bundle(own_models_dir.parent, "outside", "1")
    with TestClient(create_app(settings_for(own_models_dir))) as client:
        yield client


def assert_problem(response: object, statuses: tuple[int, ...] = (404, 405, 422)) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", BAD)
def test_bad_names_are_refused_by_every_route(admin_client: TestClient, bad: str) -> None:
    client = admin_client
    reload = client.post(f"/v1/models/{bad}/reload", headers=ADMIN)
    assert_problem(reload)
    for path in (f"/v1/models/{bad}/versions/1/activate", f"/v1/models/tiny/versions/{bad}/activate"):
        assert_problem(client.post(path, headers=ADMIN))
    assert_problem(client.get(f"/v1/models/{bad}"))
    assert_problem(client.post(f"/v1/models/{bad}/segment", content=png_bytes(scene(16, 16)), headers=PNG))
    assert_problem(client.get(f"/v1/models/{bad}/bias"))
    # Nothing changed: the default model still serves, and nothing outside models_dir is listed.
    assert client.get("/readyz").status_code == 200
    listing = client.get("/v1/models").json()
    assert sorted(m["name"] for m in listing) == ["plain", "tiny"]
    assert "outside" not in client.get("/v1/models").text


def test_dot_names_are_a_422_naming_the_pattern(admin_client: TestClient) -> None:
    response = admin_client.post("/v1/models/%2E%2E/reload", headers=ADMIN)
    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "/problems/invalid-request" and "name" in body["detail"]
    assert "/" not in body["detail"].replace("/problems", "")  # no path of the server's


@pytest.mark.parametrize("bad", [".", "..", "../x", "", ".hidden", "a/b"])
def test_the_registry_refuses_bad_names_before_touching_the_disk(tmp_path: Path, bad: str) -> None:
    def loader(path: Path) -> object:
        raise AssertionError(f"loader called for {path}")

    registry = ModelRegistry(tmp_path / "missing", loader)  # type: ignore[arg-type]
    with pytest.raises(BadName):
        registry.reload(bad)
    with pytest.raises(BadName):
        registry.activate("tiny", bad)
    with pytest.raises(BadName):
        registry.get(bad)


@pytest.mark.parametrize("field", ["default_model", "pinned_versions"])
def test_settings_refuse_bad_names(tmp_path: Path, field: str) -> None:
    value: object = ".." if field == "default_model" else {"tiny": ".."}
    with pytest.raises(ValueError, match="expected letters, digits"):
        ServiceSettings(models_dir=tmp_path, **{field: value})  # type: ignore[arg-type]
