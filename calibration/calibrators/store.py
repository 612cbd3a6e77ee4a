"""The fitted calibrators of a bundle: ``calibrators.json`` beside calibration.npz, schema-versioned and
validated on load like the tables (errors name the field)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calibration.calibrators.calibrator import CALIBRATOR_NAMES, Calibrator

CALIBRATORS_FILE = "calibrators.json"
CALIBRATORS_SCHEMA = 1


class CalibratorFormatError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class _StoredCalibrator(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    temperature: float = Field(default=1.0, gt=0.0)
    bias: list[float] | None = None
    tau: float | None = Field(default=None, ge=0.0, le=10.0)
    fit: dict[str, Any] = Field(default_factory=dict)


class _CalibratorsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int
    num_classes: int = Field(ge=2, le=255)
    calibrators: list[_StoredCalibrator]


def calibrators_json(calibrators: Mapping[str, Calibrator], num_classes: int) -> dict[str, Any]:
    return {
        "schema_version": CALIBRATORS_SCHEMA,
        "num_classes": num_classes,
        "calibrators": [
            {
                "name": cal.name,
                "temperature": float(cal.temperature),
                "bias": None if cal.bias is None else [float(v) for v in np.asarray(cal.bias)],
                "tau": None if cal.tau is None else float(cal.tau),
                "fit": cal.fit,
            }
            for cal in calibrators.values()
        ],
    }


def write_calibrators(path: str | Path, calibrators: Mapping[str, Calibrator], num_classes: int) -> Path:
    path = Path(path)
    text = json.dumps(calibrators_json(calibrators, num_classes), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def parse_calibrators(raw: object, num_classes: int) -> dict[str, Calibrator]:
    """JSON of calibrators_json -> name -> Calibrator, in file order; CalibratorFormatError names the field."""
    if not isinstance(raw, dict):
        raise CalibratorFormatError("(root)", f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("schema_version") != CALIBRATORS_SCHEMA:
        raise CalibratorFormatError(
            "schema_version",
            f"expected schema version {CALIBRATORS_SCHEMA}, got {raw.get('schema_version')!r} "
            "(re-create the bundle with this version of blda, or upgrade blda)",
        )
    try:
        parsed = _CalibratorsFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise CalibratorFormatError(field, first["msg"]) from exc
    if parsed.num_classes != num_classes:
        raise CalibratorFormatError(
            "num_classes", f"expected {num_classes} (the model's), got {parsed.num_classes}"
        )
    out: dict[str, Calibrator] = {}
    for i, item in enumerate(parsed.calibrators):
        where = f"calibrators.{i}"
        if item.name not in CALIBRATOR_NAMES:
            raise CalibratorFormatError(
                f"{where}.name", f"expected one of {list(CALIBRATOR_NAMES)}, got {item.name!r}"
            )
        if item.name in out:
            raise CalibratorFormatError(
                f"{where}.name", f"expected each calibrator once, got {item.name!r} twice"
            )
        if item.bias is not None and len(item.bias) != num_classes:
            raise CalibratorFormatError(
                f"{where}.bias", f"expected {num_classes} values, got {len(item.bias)}"
            )
        if item.bias is not None and not np.all(np.isfinite(item.bias)):
            raise CalibratorFormatError(f"{where}.bias", "expected finite values, got inf or nan")
        try:
            out[item.name] = Calibrator(
                item.name,
                item.temperature,
                None if item.bias is None else np.asarray(item.bias, np.float64),
                item.tau,
                dict(item.fit),
            )
        except ValueError as exc:
            raise CalibratorFormatError(where, str(exc)) from exc
    if "none" not in out:
        raise CalibratorFormatError("calibrators", "expected a 'none' entry (the raw decision), got none")
    return out


def read_calibrators(path: str | Path, num_classes: int) -> dict[str, Calibrator]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibratorFormatError("(root)", f"expected readable JSON, got {exc}") from exc
    return parse_calibrators(raw, num_classes)
