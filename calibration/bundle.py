"""The bundle: what carries a model and its calibration from training to serving.

Layout: ``models/<name>/<version>/`` holding

- ``model.onnx``: one float32 input (N, 3, H, W) and one float32 logits output (N, C, H', W'), their graph
  names recorded in the manifest (``input.name``, ``output.name``; "image" and "logits" by default, the
  names `blda export` gives them, so bundles written before the fields existed still load);
- ``calibration.npz``: the arrays of :class:`calibration.tables.CalibrationTables` (optional);
- ``calibrators.json``: the fitted calibrators (calibration.calibrators.store; optional: a bundle without it
  serves "none" and, with tables, "blda" at the manifest's τ, as bundles did before calibrators existed);
- ``manifest.json``: :class:`Manifest`, including the sha256 of each file above.

Every load error is a :class:`BundleError` naming the file and the field that is wrong, so that an
operator can fix the bundle without reading a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from calibration.calibrators.calibrator import CALIBRATOR_NAMES, Calibrator
from calibration.calibrators.store import (
    CALIBRATORS_FILE,
    CalibratorFormatError,
    read_calibrators,
    write_calibrators,
)
from calibration.tables import CalibrationFormatError, CalibrationTables

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.npz"

# Names and versions become path components and Prometheus label values: keep them tame.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Error type of the classes-vs-num_classes check, reported on the field `classes`.
_CLASSES_ERROR = "classes_vs_num_classes"


class BundleError(Exception):
    """A bundle that cannot be used, with the file and field at fault."""

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file = str(file)
        self.field = field
        self.message = message
        super().__init__(f"{self.file}: {field}: {message}" if field else f"{self.file}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassInfo(_Strict):
    id: int = Field(ge=0, le=254)
    name: str = Field(min_length=1, max_length=64)
    color: tuple[int, int, int]

    @field_validator("color")
    @classmethod
    def _rgb(cls, color: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= v <= 255 for v in color):
            raise ValueError(f"expected RGB values in 0..255, got {list(color)}")
        return color


class InputSpec(_Strict):
    """How an RGB uint8 image becomes the model's input tensor: ``(x / pixel_scale - mean) / std``."""

    # The graph's input name (any exported model names its input its own way).
    name: str = Field(default="image", min_length=1, max_length=256)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float = Field(default=255.0, gt=0)
    # (H, W) the image is resized to before inference; None feeds the image at its own size.
    size: tuple[int, int] | None = None
    # Input sides must be multiples of this (the network's total stride) when size is None.
    multiple_of: int = Field(default=32, ge=1)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(v > 0 for v in std):
            raise ValueError(f"expected positive std values, got {list(std)}")
        return std

    @field_validator("size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is not None and not all(v > 0 for v in size):
            raise ValueError(f"expected a positive (height, width), got {list(size)}")
        return size


class OutputSpec(_Strict):
    # The graph's output holding the logits (N, C, H', W').
    name: str = Field(default="logits", min_length=1, max_length=256)
    num_classes: int = Field(ge=2, le=255)
    # Input pixels per logit pixel along each side (4 for logits at 1/4 of the input).
    stride: int = Field(ge=1)


class CalibrationSpec(_Strict):
    enabled_default: bool = True
    tau_default: float = Field(default=0.2, ge=0.0, le=10.0)
    eps: float = Field(default=0.01, gt=0.0, lt=0.5)
    num_knots: int = Field(default=256, ge=2)
    source_domain: str = ""
    target_domain: str = ""
    # The calibrators of calibrators.json and the one served by default (None: a bundle from before
    # calibrators, which serves "none" and "blda"); the tuning-split table they were chosen on.
    calibrators: list[str] | None = None
    default_calibrator: str | None = None
    tuning_table: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_calibrators(self) -> CalibrationSpec:
        names = self.calibrators or []
        unknown = [n for n in names if n not in CALIBRATOR_NAMES]
        if unknown:
            raise ValueError(f"calibrators: expected names among {list(CALIBRATOR_NAMES)}, got {unknown}")
        if self.default_calibrator is not None and self.default_calibrator not in names:
            raise ValueError(
                f"default_calibrator: expected one of the calibrators {names}, got {self.default_calibrator!r}"
            )
        return self


class Provenance(_Strict):
    trained: bool
    network: str
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    blda_version: str = "0.1.0"
    config: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    schema_version: int
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    classes: list[ClassInfo]
    input: InputSpec
    output: OutputSpec
    calibration: CalibrationSpec | None = None
    provenance: Provenance
    # sha256 (hex) of each file of the bundle, filled in by save_bundle.
    files: dict[str, str] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"expected schema version {SCHEMA_VERSION}, got {version} "
                "(re-export the bundle with this version of blda, or upgrade blda)"
            )
        return version

    @model_validator(mode="after")
    def _classes_match_output(self) -> Manifest:
        ids = [c.id for c in self.classes]
        if ids != list(range(self.output.num_classes)):
            # A custom error type: read_manifest names the field `classes` (a model-level error has no loc).
            raise PydanticCustomError(
                _CLASSES_ERROR,
                "expected classes with ids 0..{last} in order (output.num_classes = {n}), got ids {ids}",
                {"last": self.output.num_classes - 1, "n": self.output.num_classes, "ids": str(ids)},
            )
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def palette(self) -> np.ndarray:
        """(C, 3) uint8 colours of the classes."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: Manifest
    model_path: Path
    tables: CalibrationTables | None
    # name -> fitted calibrator, in table order; what requests may ask for (calibrator=).
    calibrators: dict[str, Calibrator] = field(default_factory=lambda: {"none": Calibrator("none")})
    default_calibrator: str = "none"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_calibration(path: str | Path, tables: CalibrationTables) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **tables.to_arrays())  # type: ignore[arg-type]
    return path


def read_calibration(path: str | Path) -> CalibrationTables:
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "", "expected a calibration file (.npz), but it does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(
            path, "", f"expected a readable .npz archive, got a corrupted file ({exc})"
        ) from exc
    try:
        return CalibrationTables.from_arrays(arrays)
    except CalibrationFormatError as exc:
        raise BundleError(path, exc.field, exc.message) from exc


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "", "expected a manifest.json, but it does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(path, "", f"expected JSON, got unparsable text ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(path, "", f"expected a JSON object, got {type(raw).__name__}")
    # Check the schema version first: a bundle from another schema fails for that reason alone.
    if "schema_version" not in raw:
        raise BundleError(path, "schema_version", "expected a field schema_version, but it is missing")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            path,
            "schema_version",
            f"expected schema version {SCHEMA_VERSION}, got {raw['schema_version']!r} "
            "(re-export the bundle with this version of blda, or upgrade blda)",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        if first["type"] == _CLASSES_ERROR:
            field = "classes"
        message = first["msg"]
        if first["type"] == "missing":
            message = f"expected a field {field}, but it is missing"
        elif "input" in first and first["type"] not in ("value_error", _CLASSES_ERROR):
            message = f"{message}, got {first['input']!r}"
        raise BundleError(path, field, message) from exc


def sniff_model_file(path: str | Path) -> str | None:
    """What a model file is, from its first bytes: "a torch checkpoint" (torch.save writes a zip archive,
    or a pickle in its legacy format), "an ONNX model" (a protobuf whose first field is ir_version), or
    None. Lets a checkpoint given where a bundle is expected (and the reverse) be named in one line."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "a torch checkpoint"
    if path.suffix == ".onnx" or head[:1] == b"\x08":
        return "an ONNX model"
    return None


def load_bundle(directory: str | Path) -> Bundle:
    """Read and validate a bundle: manifest schema, file checksums, calibration arrays and their consistency."""
    directory = Path(directory)
    if directory.is_file():
        kind = sniff_model_file(directory)
        hint = {
            "a torch checkpoint": " (a torch checkpoint: export it with `blda export --checkpoint`, or pass it as --checkpoint)",
            "an ONNX model": " (an ONNX model: bundle it with `blda bundle create --onnx`)",
        }.get(kind or "", "")
        raise BundleError(
            directory,
            "",
            f"expected a bundle directory (NAME/VERSION/ with {MANIFEST_FILE}), got a file{hint}",
        )
    if not directory.is_dir():
        raise BundleError(directory, "", "expected a bundle directory, but it does not exist")
    manifest = read_manifest(directory / MANIFEST_FILE)
    manifest_path = directory / MANIFEST_FILE
    if MODEL_FILE not in manifest.files:
        raise BundleError(
            manifest_path, "files", f"expected a sha256 entry for {MODEL_FILE}, but it is missing"
        )
    for file_name, expected in manifest.files.items():
        file_path = directory / file_name
        if not file_path.is_file():
            raise BundleError(
                file_path, "", f"expected the file listed in {MANIFEST_FILE}, but it is missing"
            )
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(
                file_path,
                "sha256",
                f"expected {expected} (from {MANIFEST_FILE}), got {actual}: the file changed",
            )
    tables = None
    if CALIBRATION_FILE in manifest.files:
        tables = read_calibration(directory / CALIBRATION_FILE)
        if tables.num_classes != manifest.output.num_classes:
            raise BundleError(
                directory / CALIBRATION_FILE,
                "num_classes",
                f"expected {manifest.output.num_classes} classes (from {MANIFEST_FILE}), got {tables.num_classes}",
            )
    if manifest.calibration is not None and tables is None:
        raise BundleError(
            manifest_path,
            "calibration",
            f"expected {CALIBRATION_FILE} since the manifest has a calibration section",
        )
    calibrators, default = _served_calibrators(directory, manifest, tables)
    return Bundle(
        directory=directory,
        manifest=manifest,
        model_path=directory / MODEL_FILE,
        tables=tables,
        calibrators=calibrators,
        default_calibrator=default,
    )


def legacy_calibrators(spec: CalibrationSpec | None, has_tables: bool) -> tuple[dict[str, Calibrator], str]:
    """What a bundle without calibrators.json serves: "none", and "blda" at the manifest's τ with tables;
    the default is "blda" when the manifest enables calibration by default."""
    out = {"none": Calibrator("none")}
    if not has_tables:
        return out, "none"
    tau = spec.tau_default if spec is not None else 0.2
    out["blda"] = Calibrator("blda", tau=tau)
    return out, "blda" if (spec.enabled_default if spec is not None else True) else "none"


def _served_calibrators(
    directory: Path, manifest: Manifest, tables: CalibrationTables | None
) -> tuple[dict[str, Calibrator], str]:
    spec = manifest.calibration
    path = directory / CALIBRATORS_FILE
    manifest_path = directory / MANIFEST_FILE
    if CALIBRATORS_FILE not in manifest.files:
        if spec is not None and spec.calibrators is not None:
            raise BundleError(
                manifest_path,
                "calibration.calibrators",
                f"expected {CALIBRATORS_FILE} for the calibrators listed",
            )
        return legacy_calibrators(spec, tables is not None)
    try:
        calibrators = read_calibrators(path, manifest.output.num_classes)
    except CalibratorFormatError as exc:
        raise BundleError(path, exc.field, exc.message) from exc
    needs = [n for n, c in calibrators.items() if c.uses_tables]
    if needs and tables is None:
        raise BundleError(path, "calibrators", f"expected {CALIBRATION_FILE} for {needs}, got no tables")
    listed = spec.calibrators if spec is not None else None
    if listed != list(calibrators):
        raise BundleError(
            manifest_path,
            "calibration.calibrators",
            f"expected the calibrators of {CALIBRATORS_FILE} {list(calibrators)}, got {listed}",
        )
    assert spec is not None
    return calibrators, spec.default_calibrator or "none"


def stored_calibrators(bundle: Bundle) -> dict[str, Calibrator] | None:
    """The calibrators to write with a copy of ``bundle`` (save_bundle): its own when its manifest lists
    them (a calibrators.json), None for a bundle from before calibrators (which serves them unstored)."""
    spec = bundle.manifest.calibration
    return bundle.calibrators if spec is not None and spec.calibrators is not None else None


def save_bundle(
    models_dir: str | Path,
    model_onnx: str | Path | bytes,
    tables: CalibrationTables | None,
    manifest: Manifest,
    calibrators: dict[str, Calibrator] | None = None,
) -> Path:
    """Write ``models_dir/<name>/<version>/`` atomically and return its path (with calibrators.json when
    `calibrators` are given; the manifest's calibration section must list them).

    The bundle is assembled in a temporary sibling directory and renamed into place, so a reader (the
    service's hot reload) never sees a half-written bundle. An existing version is replaced.
    """
    target = Path(models_dir) / manifest.name / manifest.version
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=target.parent))
    try:
        # mkdtemp makes the directory private (0700): a service running as another user must read it.
        staging.chmod(0o755)
        if isinstance(model_onnx, bytes):
            (staging / MODEL_FILE).write_bytes(model_onnx)
        else:
            shutil.copyfile(model_onnx, staging / MODEL_FILE)
        files = {MODEL_FILE: sha256_file(staging / MODEL_FILE)}
        if tables is not None:
            if tables.num_classes != manifest.output.num_classes:
                raise BundleError(
                    CALIBRATION_FILE,
                    "num_classes",
                    f"expected {manifest.output.num_classes} classes (from the manifest), got {tables.num_classes}",
                )
            write_calibration(staging / CALIBRATION_FILE, tables)
            files[CALIBRATION_FILE] = sha256_file(staging / CALIBRATION_FILE)
        if calibrators is not None:
            write_calibrators(staging / CALIBRATORS_FILE, calibrators, manifest.output.num_classes)
            files[CALIBRATORS_FILE] = sha256_file(staging / CALIBRATORS_FILE)
        final = manifest.model_copy(update={"files": files})
        text = json.dumps(final.model_dump(mode="json"), indent=2) + "\n"
        (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")
        if target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def discover_bundles(models_dir: str | Path) -> list[Path]:
    """Bundle directories ``<name>/<version>/`` below models_dir (those holding a manifest), sorted."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found = [
        path.parent
        for path in root.glob(f"*/*/{MANIFEST_FILE}")
        if not path.parent.name.startswith(".") and not path.parent.parent.name.startswith(".")
    ]
    return sorted(found)


_VERSION_PART = re.compile(r"(\d+)|(\D+)")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key for versions ('0.10.0' > '0.9.1'; numbers compare as numbers)."""
    return tuple((0, int(num)) if num else (1, text) for num, text in _VERSION_PART.findall(version))


def served_version(models_dir: str | Path, name: str) -> str | None:
    """The version of ``name`` the service serves when nothing is pinned: the highest with a manifest."""
    versions = [b.name for b in discover_bundles(models_dir) if b.parent.name == name]
    return max(versions, key=version_key) if versions else None


def served_note(models_dir: str | Path, name: str, written: str) -> str:
    """One line saying which version of ``name`` the service will serve, after writing ``written``."""
    served = served_version(models_dir, name)
    if served == written:
        return f"the service serves {name}/{written} (the highest version, unless another is pinned)"
    return (
        f"note: the service serves {name}/{served} (the highest version), not {name}/{written}, "
        f"unless pinned (settings pinned_versions, or POST /v1/models/{name}/versions/{written}/activate)"
    )


def next_version(models_dir: str | Path, name: str) -> str:
    """The version after the highest one of ``models_dir/name`` (its last number plus one), or "1.0.0".

    The service serves the highest version, so a new bundle written below an existing one would silently
    not be served: tools default to this instead of a fixed version.
    """
    root = Path(models_dir) / name
    present = (
        [p.name for p in root.iterdir() if p.is_dir() and re.match(_NAME_PATTERN, p.name)]
        if root.is_dir()
        else []
    )
    if not present:
        return "1.0.0"
    highest = max(present, key=version_key)
    numbers = list(re.finditer(r"\d+", highest))
    if not numbers:
        return f"{highest}.1"
    last = numbers[-1]
    return f"{highest[: last.start()]}{int(last.group()) + 1}{highest[last.end() :]}"
