"""Service configuration: typed, validated, from ``BLDA_*`` environment variables and an optional file.

Precedence (highest first): keyword arguments, environment variables, the settings file, defaults. The
file is TOML or JSON (by suffix) with the same field names, e.g.::

    models_dir = "/srv/models"
    default_model = "segformer-b0"
    pinned_versions = { "segformer-b0" = "3" }

``BLDA_SETTINGS_FILE`` names the file when :func:`load_settings` is not given one. Secrets (the admin
key) have no default: without a key the admin endpoints are disabled.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from calibration.segmentation import DEFAULT_DECISION_SCALE
from service.names import check_name

SETTINGS_FILE_ENV = "BLDA_SETTINGS_FILE"


class SettingsFileError(ValueError):
    """A settings file that cannot be read, naming the file."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# `blda serve` without --workers (nor BLDA_WORKERS): one worker per core, at most this many (each worker
# holds its own copy of every bundle).
AUTO_WORKERS_MAX = 8


def auto_workers(cores: int) -> int:
    """Worker processes for ``cores`` CPU cores: one per core, each with one onnxruntime thread.

    Measured on 2 cores (`python -m bench service --variants`): a request costs more CPU than its
    latency (telemetry and the Prometheus histograms run after the response; the GIL serialises the
    Python parts of decoding, deciding and HTTP), so one process with two onnxruntime threads cannot use
    both cores under load, and two processes can.
    """
    return max(1, min(cores, AUTO_WORKERS_MAX))


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLDA_", extra="forbid", validate_default=True)

    # Bundles live in models_dir/<name>/<version>/.
    models_dir: Path = Path("models")
    # The model behind POST /v1/segment; None: the only model, or the first by name.
    default_model: str | None = None
    # name -> version served instead of the highest version.
    pinned_versions: dict[str, str] = Field(default_factory=dict)
    # Unset disables POST /v1/models/{name}/reload and .../activate.
    admin_api_key: SecretStr | None = None

    # Limits on client input: bytes of the request body, pixels of the decoded image (checked from the
    # header, before decoding).
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)

    # Processes uvicorn runs (`blda serve` without --workers nor this: auto_workers(cores)); onnxruntime
    # threads default to cores // workers so workers do not fight.
    workers: int = Field(default=1, ge=1)
    intra_op_threads: int | None = Field(default=None, ge=1)
    # "auto" uses CUDA when a session really runs on it, "cpu" never tries.
    execution_provider: Literal["auto", "cpu"] = "auto"
    # Requests whose inference may run at once; more queue (decode and encode still overlap).
    max_concurrent_inferences: int = Field(default=1, ge=1)
    # Segment requests admitted at once per process (reading, queued or running); past it: 503 with
    # Retry-After, so that a burst is refused early instead of holding every upload in memory.
    max_pending_requests: int = Field(default=64, ge=1)
    # Request bodies being received at once per process (segment and feedback), each at most
    # max_body_bytes. They hold no admission slot: a slot (max_pending_requests) is taken only once a
    # body has fully arrived, so slow senders cannot starve fast ones; past this limit, 503 overloaded
    # before anything is read. Request bodies in memory: at most
    # (max_uploads_in_transit + max_pending_requests) x max_body_bytes per process.
    max_uploads_in_transit: int = Field(default=32, ge=1)

    # Timeouts of the HTTP server (the h11 protocol of service.http; uvicorn's own options otherwise).
    # Request line and headers must arrive within header_timeout_s of their first byte (or of the
    # connection), and be at most max_header_bytes in all: slow or huge headers cannot hold memory.
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    max_header_bytes: int = Field(default=64 * 1024, ge=4096, le=16 * 1024 * 1024)
    # A body must arrive within body_timeout_s in all, and after a grace of body_min_rate_grace_s at
    # body_min_rate_bytes_s on average at least (0: no minimum rate); else 408 and the connection closes.
    body_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    body_min_rate_bytes_s: float = Field(default=1024.0, ge=0.0)
    body_min_rate_grace_s: float = Field(default=5.0, ge=0.0, le=3600.0)
    # Idle keep-alive connections close after this; on SIGTERM, requests in progress get
    # graceful_shutdown_s to finish before they are cancelled.
    keep_alive_s: int = Field(default=5, ge=1, le=3600)
    graceful_shutdown_s: int = Field(default=10, ge=1, le=3600)

    # Shared state of the workers and replicas (service.state): predictions awaiting feedback, the
    # registry's generation. memory:// (one process), sqlite:///path (one host; `blda serve --workers N`
    # creates one when unset), redis://host:port/db (several replicas).
    state_url: str = Field(default="memory://", pattern=r"^(memory|sqlite|redis|rediss|unix)://")

    # Workers catch up with admin changes made elsewhere before each request and every sync_interval_s
    # (service.sync); an admin answer waits at most admin_sync_timeout_s for every worker to switch.
    sync_interval_s: float = Field(default=0.5, gt=0.0, le=60.0)
    admin_sync_timeout_s: float = Field(default=10.0, ge=0.0, le=300.0)

    # text: uvicorn's usual logs; json: JSON lines, one per request with its id, model, version, status and
    # stage times (service.logs).
    log_format: Literal["text", "json"] = "text"

    # Threads for decoding, calibration and encoding.
    cpu_threads: int | None = Field(default=None, ge=1)

    # Micro-batching of concurrent requests: off when batch_max_size is 1. A batch runs when it is full or
    # when its first request has waited batch_max_wait_ms. It only helps when the accelerator has spare
    # width (a GPU); on CPU a batch costs about as much as its requests run one by one (see bench/service.py).
    batch_max_size: int = Field(default=1, ge=1, le=64)
    batch_max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)

    # zlib level of the PNG masks: palette masks compress well even at 1, and 1 is several times faster
    # than the default 6.
    png_compress_level: int = Field(default=1, ge=0, le=9)
    # JPEG uploads are decoded at reduced scale (libjpeg's DCT scaling, 1/2 to 1/8) down to the smallest
    # size at least the model's input when that input is at most half the image: a 1024 x 2048 JPEG
    # decodes in ~2 ms instead of ~9 plus a ~8 ms resize, with no loss of accuracy measured
    # (`python -m bench decode_scaling`). False: always decode at full size.
    scaled_decode: bool = True
    # Pixels of decision processed at once, raw and calibrated (bounds the working memory: the upsampled
    # logits of one band, C x this x 4 bytes).
    calibration_chunk_pixels: int = Field(default=65536, ge=1024)
    # Decisions are made on logits upsampled bilinearly to the model's input size times this, at most the
    # image's own size, then resized to the image by nearest neighbour (calibration.segmentation). At 2,
    # a 512 x 1024 image through a 128 x 256 input is decided at 256 x 512: 2-pixel steps, not 16-pixel
    # blocks of stride-4 logits; larger values cost calibrated-rule time for little visible detail.
    decision_scale: float = Field(default=DEFAULT_DECISION_SCALE, gt=0.0, le=16.0)

    @field_validator("admin_api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: Any) -> Any:
        # BLDA_ADMIN_API_KEY="" (a blank line in an env file) must disable admin, not make "" the key.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _pinned_names(self) -> ServiceSettings:
        for name, version in self.pinned_versions.items():
            if not name or not version:
                raise ValueError(f"expected pinned_versions as {{name: version}}, got {name!r}: {version!r}")
            check_name("pinned_versions model name", name)
            check_name("pinned_versions version", version)
        if self.default_model is not None:
            check_name("default_model", self.default_model)
        return self

    def onnx_threads(self) -> int:
        return self.intra_op_threads or max(1, available_cores() // self.workers)

    def thread_pool_size(self) -> int:
        return self.cpu_threads or max(2, available_cores() // self.workers)


def read_settings_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsFileError(f"{path}: expected a readable settings file, got {exc.strerror}") from exc
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            raise SettingsFileError(f"{path}: expected a .toml or .json settings file, got {path.suffix!r}")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsFileError(f"{path}: expected valid {path.suffix[1:].upper()}, got: {exc}") from exc
    if not isinstance(values, dict):
        raise SettingsFileError(f"{path}: expected a table of settings, got {type(values).__name__}")
    return values


def load_settings(settings_file: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from the file (or ``$BLDA_SETTINGS_FILE``), then the environment, then overrides (highest)."""
    settings_file = settings_file or os.environ.get(SETTINGS_FILE_ENV) or None
    if settings_file is None:
        return ServiceSettings(**overrides)
    from_file = read_settings_file(settings_file)
    # Fields the environment sets win over the file: read them on their own first.
    from_env = ServiceSettings(**overrides)
    explicit = {name: getattr(from_env, name) for name in from_env.model_fields_set}
    return ServiceSettings(**{**from_file, **explicit})
