"""A recalibration's result as a new bundle version: the base version's model file and manifest, the
refitted tables, and the provenance of the refit (time window, pixels per class, PIT before and after)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calibration.bundle import Bundle, next_version, save_bundle, stored_calibrators
from calibration.refit import RefitConfig
from calibration.tables import CalibrationTables
from calibration.traffic import TrafficRefit, TrafficSample


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds")


def recalibration_provenance(
    base: Bundle, sample: TrafficSample, refit: TrafficRefit, config: RefitConfig, source: str
) -> dict[str, Any]:
    return {
        "source": source,
        "base_version": base.version,
        "window": {"first": _iso(sample.first_s), "last": _iso(sample.last_s)},
        "requests": sample.requests,
        "pixels": sample.num_pixels,
        "refit": {
            "min_row_pixels": config.min_row_pixels,
            "max_samples": config.max_samples,
            "components": config.components,
            "keep_fraction": config.keep_fraction,
        },
        **refit.to_dict(base.manifest.class_names),
    }


def write_candidate(
    models_dir: Path,
    base: Bundle,
    tables: CalibrationTables,
    recalibration: dict[str, Any],
    version: str | None = None,
) -> Path:
    """Write ``models_dir/<name>/<version>/`` (default: the next version) beside ``base``; its path."""
    manifest = base.manifest
    version = version if version is not None else next_version(models_dir, manifest.name)
    provenance = manifest.provenance.model_copy(
        update={
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": {**manifest.provenance.data, "recalibration": recalibration},
        }
    )
    description = (
        f"{manifest.description} Target tables refitted from live traffic on {base.version}.".strip()
    )
    candidate = manifest.model_copy(
        update={"version": version, "provenance": provenance, "description": description, "files": {}}
    )
    # The fitted calibrators (offsets, temperatures, τ) do not depend on the target tables: they carry
    # over, so that the candidate serves the same calibrator=, now on the refitted tables.
    return save_bundle(models_dir, base.model_path, tables, candidate, stored_calibrators(base))
