"""The bundle format: round trip, and one distinct, file- and field-named error per kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.bundle import (
    CALIBRATION_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    BundleError,
    CalibrationSpec,
    ClassInfo,
    InputSpec,
    Manifest,
    OutputSpec,
    Provenance,
    discover_bundles,
    load_bundle,
    read_calibration,
    save_bundle,
    version_key,
    write_calibration,
)
from calibration.distributions import Gmm
from calibration.tables import CalibrationTables, build_calibration_tables

C = 4
K = 3


def _tables(seed: int = 0) -> CalibrationTables:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(K), size=(C, C))
    means = rng.normal(0.0, 3.0, size=(C, C, K)) + 6.0 * np.eye(C)[:, :, None]
    stds = rng.uniform(0.5, 2.0, size=(C, C, K))
    counts = rng.integers(100, 1000, size=(C, C))
    return build_calibration_tables(Gmm(weights, means, stds), counts, num_knots=64)


def _manifest(name: str = "toy", version: str = "1.0.0") -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version=version,
        classes=[ClassInfo(id=i, name=f"class{i}", color=(i * 40, 0, 255 - i * 40)) for i in range(C)],
        input=InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=(64, 128)),
        output=OutputSpec(num_classes=C, stride=4),
        calibration=CalibrationSpec(tau_default=0.2),
        provenance=Provenance(trained=False, network="toy", config={"lr": 0.01}),
    )


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return save_bundle(tmp_path / "models", b"not really onnx", _tables(), _manifest())


def test_round_trip(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle_dir == tmp_path / "models" / "toy" / "1.0.0"
    assert bundle.manifest.model_copy(update={"files": {}}) == _manifest().model_copy(update={"files": {}})
    assert set(bundle.manifest.files) == {MODEL_FILE, CALIBRATION_FILE}
    assert bundle.model_path.read_bytes() == b"not really onnx"
    assert bundle.tables is not None
    original = _tables().to_arrays()
    loaded = bundle.tables.to_arrays()
    assert original.keys() == loaded.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert bundle.manifest.palette().shape == (C, 3)
    assert discover_bundles(tmp_path / "models") == [bundle_dir]
    assert bundle_dir.stat().st_mode & 0o777 == 0o755


def test_resave_replaces_atomically(bundle_dir: Path, tmp_path: Path) -> None:
    save_bundle(tmp_path / "models", b"second", None, _manifest().model_copy(update={"calibration": None}))
    bundle = load_bundle(bundle_dir)
    assert bundle.model_path.read_bytes() == b"second"
    assert bundle.tables is None
    # No staging or retired directories are left behind for the registry to trip over.
    assert [p.name for p in (tmp_path / "models" / "toy").iterdir()] == ["1.0.0"]


def _error(bundle_dir: Path) -> BundleError:
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    return info.value


def test_corrupted_calibration_file(bundle_dir: Path) -> None:
    path = bundle_dir / CALIBRATION_FILE
    path.write_bytes(path.read_bytes()[:100])
    err = _error(bundle_dir)
    assert err.file.endswith(CALIBRATION_FILE) and err.field == "sha256"
    assert "the file changed" in str(err)


def test_corrupted_npz_with_matching_checksum(bundle_dir: Path) -> None:
    path = bundle_dir / CALIBRATION_FILE
    path.write_bytes(b"PK\x03\x04 garbage")
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    from calibration.bundle import sha256_file

    manifest["files"][CALIBRATION_FILE] = sha256_file(path)
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    err = _error(bundle_dir)
    assert err.file.endswith(CALIBRATION_FILE)
    assert "corrupted" in str(err)


def test_missing_manifest_field(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    del manifest["output"]["stride"]
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    err = _error(bundle_dir)
    assert err.file.endswith(MANIFEST_FILE)
    assert err.field == "output.stride"
    assert "missing" in str(err)


def test_wrong_schema_version(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    err = _error(bundle_dir)
    assert err.field == "schema_version"
    assert f"expected schema version {SCHEMA_VERSION}, got {SCHEMA_VERSION + 1}" in str(err)


def test_missing_model_file(bundle_dir: Path) -> None:
    (bundle_dir / MODEL_FILE).unlink()
    err = _error(bundle_dir)
    assert err.file.endswith(MODEL_FILE) and "missing" in str(err)


def test_manifest_not_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_FILE).write_text("{ not json")
    err = _error(bundle_dir)
    assert err.file.endswith(MANIFEST_FILE) and "expected JSON" in str(err)


def test_class_ids_must_match_output(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["output"]["num_classes"] = C + 1
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    err = _error(bundle_dir)
    assert f"ids 0..{C}" in str(err)


def test_tables_with_wrong_class_count(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["output"]["num_classes"] = C - 1
    manifest["classes"] = manifest["classes"][: C - 1]
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    err = _error(bundle_dir)
    assert err.file.endswith(CALIBRATION_FILE) and err.field == "num_classes"


def test_calibration_field_of_wrong_shape(tmp_path: Path) -> None:
    arrays = _tables().to_arrays()
    key = next(iter(arrays))
    arrays[key] = np.zeros((2, 2, 2, 2, 2))
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(BundleError) as info:
        read_calibration(path)
    assert info.value.file == str(path)
    assert info.value.field == key


def test_write_read_calibration(tmp_path: Path) -> None:
    tables = _tables(3)
    loaded = read_calibration(write_calibration(tmp_path / "t" / "calibration.npz", tables))
    np.testing.assert_array_equal(loaded.shifts.delta, tables.shifts.delta)


def test_invalid_names_rejected() -> None:
    with pytest.raises(ValueError, match="name"):
        _manifest(name="../escape")


def test_version_order() -> None:
    versions = ["0.9.1", "0.10.0", "0.2.0", "1.0.0", "2"]
    assert sorted(versions, key=version_key) == ["0.2.0", "0.9.1", "0.10.0", "1.0.0", "2"]


def test_next_version_follows_the_highest_present(tmp_path: Path) -> None:
    from calibration.bundle import next_version

    assert next_version(tmp_path, "m") == "1.0.0"
    for version in ("1.0.0", "1.10.0", "1.9.3", ".1.11.0.tmp"):  # the hidden staging dir does not count
        (tmp_path / "m" / version).mkdir(parents=True)
    assert next_version(tmp_path, "m") == "1.10.1"
    (tmp_path / "n" / "3").mkdir(parents=True)
    assert next_version(tmp_path, "n") == "4"


def test_graph_names_default_for_bundles_written_before_they_were_recorded(bundle_dir: Path) -> None:
    path = bundle_dir / MANIFEST_FILE
    raw = json.loads(path.read_text())
    del raw["input"]["name"], raw["output"]["name"]
    path.write_text(json.dumps(raw))
    manifest = load_bundle(bundle_dir).manifest
    assert (manifest.input.name, manifest.output.name) == ("image", "logits")


def test_classes_that_disagree_with_num_classes_name_the_field(bundle_dir: Path) -> None:
    path = bundle_dir / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["classes"] = raw["classes"][:-1]
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.field == "classes"
    assert f"expected classes with ids 0..{C - 1} in order (output.num_classes = {C})" in str(err.value)
