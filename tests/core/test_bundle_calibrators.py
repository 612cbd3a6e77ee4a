"""calibrators.json in a bundle: round trip, the legacy set of bundles without it, field-named errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_bundle import C, _manifest, _tables

from calibration.bundle import MANIFEST_FILE, BundleError, CalibrationSpec, load_bundle, save_bundle
from calibration.calibrators.calibrator import Calibrator
from calibration.calibrators.store import CALIBRATORS_FILE

REPO = Path(__file__).resolve().parents[2]


def _fitted() -> dict[str, Calibrator]:
    return {
        "none": Calibrator("none"),
        "bcts-em": Calibrator("bcts-em", 1.3, np.linspace(-1, 1, C), fit={"em_iterations": 12}),
        "blda": Calibrator("blda", tau=0.4),
    }


def _save(tmp_path: Path, calibrators: dict[str, Calibrator], default: str = "bcts-em") -> Path:
    spec = CalibrationSpec(
        tau_default=0.2,
        calibrators=list(calibrators),
        default_calibrator=default,
        tuning_table=[{"calibrator": n, "miou": 0.5} for n in calibrators],
    )
    manifest = _manifest().model_copy(update={"calibration": spec})
    return save_bundle(tmp_path / "models", b"not really onnx", _tables(), manifest, calibrators)


def test_calibrators_round_trip_with_their_default(tmp_path: Path) -> None:
    bundle = load_bundle(_save(tmp_path, _fitted()))
    assert list(bundle.calibrators) == ["none", "bcts-em", "blda"]
    assert bundle.default_calibrator == "bcts-em"
    got = bundle.calibrators["bcts-em"]
    assert got.temperature == 1.3 and got.tau is None and got.fit == {"em_iterations": 12}
    assert got.bias is not None
    np.testing.assert_allclose(got.bias, np.linspace(-1, 1, C))
    assert bundle.calibrators["blda"].tau == 0.4


def test_a_bundle_without_calibrators_serves_none_and_blda_as_before() -> None:
    bundle = load_bundle(REPO / "models" / "blda-synth" / "2.0.0")
    assert list(bundle.calibrators) == ["none", "blda"]
    spec = bundle.manifest.calibration
    assert spec is not None
    assert bundle.calibrators["blda"].tau == spec.tau_default
    assert bundle.default_calibrator == ("blda" if spec.enabled_default else "none")


def _edit(path: Path, change) -> None:
    """Rewrite calibrators.json and its checksum, so that only the content is wrong."""
    import hashlib

    file = path / CALIBRATORS_FILE
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][CALIBRATORS_FILE] = hashlib.sha256(file.read_bytes()).hexdigest()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda d: d.update(schema_version=9), "schema_version", "expected schema version 1, got 9"),
        (lambda d: d["calibrators"][1].update(bias=[0.0]), "calibrators.1.bias", f"expected {C} values"),
        (lambda d: d["calibrators"][1].update(name="platt"), "calibrators.1.name", "expected one of"),
        (lambda d: d["calibrators"][1].update(temperature=-1), "calibrators.1.temperature", "greater than 0"),
        (lambda d: d.update(num_classes=C + 1), "num_classes", f"expected {C}"),
        (lambda d: d["calibrators"].pop(0), "calibrators", "'none'"),
    ],
)
def test_damaged_calibrators_name_the_field(tmp_path: Path, change, field: str, message: str) -> None:
    path = _save(tmp_path, _fitted())
    _edit(path, change)
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    assert err.value.field == field
    assert message in err.value.message


def test_the_manifest_must_list_the_files_calibrators_and_a_known_default(tmp_path: Path) -> None:
    path = _save(tmp_path, _fitted())
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["calibration"]["calibrators"] = ["none", "bcts-em"]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"expected the calibrators of calibrators\.json"):
        load_bundle(path)
    with pytest.raises(ValueError, match="default_calibrator: expected one of"):
        CalibrationSpec(calibrators=["none"], default_calibrator="blda")


def test_legacy_calibrators_follow_the_manifests_tau_and_switch() -> None:
    from calibration.bundle import legacy_calibrators

    got, default = legacy_calibrators(CalibrationSpec(tau_default=0.4, enabled_default=False), True)
    assert list(got) == ["none", "blda"] and got["blda"].tau == 0.4 and default == "none"
    assert legacy_calibrators(CalibrationSpec(enabled_default=True), True)[1] == "blda"
    assert list(legacy_calibrators(None, False)[0]) == ["none"]


def test_a_recalibrated_candidate_keeps_the_fitted_calibrators(tmp_path: Path) -> None:
    from service.recalibration.candidate import write_candidate

    base = load_bundle(_save(tmp_path, _fitted()))
    refitted = _tables()
    path = write_candidate(tmp_path / "models", base, refitted, {"requests": 3})
    candidate = load_bundle(path)
    assert candidate.version != base.version
    assert list(candidate.calibrators) == list(base.calibrators)
    assert candidate.default_calibrator == base.default_calibrator
    np.testing.assert_array_equal(candidate.calibrators["bcts-em"].bias, base.calibrators["bcts-em"].bias)
    assert candidate.calibrators["blda"].tau == 0.4
