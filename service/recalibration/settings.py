"""Settings of live recalibration (``BLDA_RECALIBRATION_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RecalibrationSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLDA_RECALIBRATION_", extra="ignore")

    # Off: no pixel of any request is kept (the per-request opt-out is ``record=false``).
    accumulate: bool = True
    # Sampled decision pixels per request: 4096 is what the exporter samples per image offline.
    pixels_per_request: int = Field(default=4096, ge=1)
    # A worker writes its buffer to the shared state once it holds this many pixels (or every flush_s).
    chunk_pixels: int = Field(default=16384, ge=1)
    flush_s: float = Field(default=1.0, gt=0)
    # The shared state holds at most this many chunks per model network (a ring: the newest replace the
    # oldest), each at most chunk_pixels x C x 4 bytes compressed: 128 x 16384 x 19 x 4 B <= 160 MB.
    ring_slots: int = Field(default=128, ge=1)
    # Chunks older than this are gone: the refit describes recent traffic only.
    window_s: float = Field(default=6 * 3600.0, gt=0)
    # A recalibration needs at least this many sampled pixels in all.
    min_pixels: int = Field(default=20000, ge=1)
    # Share of requests whose logits the shadow version also decides (no second forward pass).
    shadow_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
