"""Fixtures of the monitoring tests: the exact-arithmetic bundle, an app over it, the Prometheus tools."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import write_bundle

from calibration.tables import CalibrationTables
from service.app import create_app
from service.settings import ServiceSettings


@pytest.fixture(scope="session")
def exact_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CalibrationTables]:
    """A models directory holding the exact-arithmetic bundle, and its tables."""
    root = tmp_path_factory.mktemp("monitoring") / "models"
    _, tables = write_bundle(root)
    return root, tables


@pytest.fixture
def client(exact_models: tuple[Path, CalibrationTables]) -> Iterator[TestClient]:
    # CPU provider: the test bundle relies on exact float32 arithmetic (a GPU may round through TF32).
    settings = ServiceSettings(
        models_dir=exact_models[0], intra_op_threads=1, cpu_threads=2, execution_provider="cpu"
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client
