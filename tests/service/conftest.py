"""Fixtures of the service tests: bundles written to a temporary models directory, apps over them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import BundleFactory, manifest, random_tables, settings_for, tiny_model

from calibration.bundle import save_bundle
from calibration.tables import CalibrationTables
from service.app import create_app


@pytest.fixture(scope="session")
def tables() -> CalibrationTables:
    return random_tables(0)


@pytest.fixture(scope="session")
def make_bundle(tables: CalibrationTables) -> BundleFactory:
    def make(
        models_dir: Path,
        name: str = "tiny",
        version: str = "1",
        seed: int = 0,
        calibrated: bool = True,
        size: tuple[int, int] | None = None,
        enabled_default: bool = True,
    ) -> Path:
        return save_bundle(
            models_dir,
            tiny_model(seed),
            tables if calibrated else None,
            manifest(name, version, calibrated=calibrated, size=size, enabled_default=enabled_default),
        )

    return make


def standard_models(root: Path, make_bundle: BundleFactory) -> Path:
    """tiny/1 (calibrated), tiny/2 (calibrated, other weights: the active one), plain/1 (no tables)."""
    make_bundle(root, "tiny", "1", seed=0)
    make_bundle(root, "tiny", "2", seed=1)
    make_bundle(root, "plain", "1", seed=2, calibrated=False)
    return root


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, make_bundle: BundleFactory) -> Path:
    """The standard models, shared by the tests that only read them."""
    return standard_models(tmp_path_factory.mktemp("shared") / "models", make_bundle)


@pytest.fixture
def own_models_dir(tmp_path: Path, make_bundle: BundleFactory) -> Path:
    """The standard models in this test's own directory, free to change."""
    return standard_models(tmp_path / "models", make_bundle)


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    """An app over the shared models: for tests that do not change what it serves."""
    with TestClient(create_app(settings_for(models_dir))) as test_client:
        yield test_client
