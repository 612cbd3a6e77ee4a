"""Served predictions kept for a while, so that a client can send the ground truth back.

``POST /v1/feedback`` needs the decisions the service made for a request id. They are kept here at the
logit resolution, zlib-compressed (a palette-like uint8 mask compresses 10-50x), under two bounds: at
most ``max_entries`` predictions (the oldest go first) and for at most ``ttl_s`` seconds.

The store lives in the service's shared state (:mod:`service.state`): in this process by default, in
SQLite for the workers of one ``blda serve``, in Redis (``BLDA_STATE_URL``) for several replicas; a
feedback then works through any worker or replica. The prediction is stored before the response is
sent, so a feedback right after it finds it.
"""

from __future__ import annotations

import io
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from calibration.bias import confusion_matrix
from calibration.labels import IGNORE_INDEX
from service.imaging import resize_nearest
from service.records import SegmentationRecord
from service.state import MemoryStore, StateStore


class FeedbackSettings(BaseSettings):
    """How many served predictions are kept, and how long (``BLDA_FEEDBACK_MAX_ENTRIES``, ``..._TTL_S``)."""

    model_config = SettingsConfigDict(env_prefix="BLDA_FEEDBACK_", extra="ignore")

    max_entries: int = Field(default=10_000, ge=1)
    ttl_s: float = Field(default=900.0, gt=0)


class MaskError(ValueError):
    """A ground-truth mask that cannot be compared with the served prediction."""


class FeedbackError(LookupError):
    """A request id the store cannot give feedback for; ``reason``: ``unknown`` (or expired), ``used``."""

    def __init__(self, request_id: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reason = reason


@dataclass(frozen=True)
class ServedPrediction:
    request_id: str
    model_name: str
    model_version: str
    num_classes: int
    input_size: tuple[int, int]  # (H, W) of the uploaded image
    logit_shape: tuple[int, int]  # (h, w) of the decisions
    raw: bytes  # zlib of the (h, w) uint8 raw decision
    calibrated: bytes | None  # zlib of the (h, w) uint8 calibrated decision
    served_at: float  # the store's clock

    def decisions(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw and calibrated decisions, (h, w) uint8 each."""
        raw = decompress_mask(self.raw, self.logit_shape)
        cal = decompress_mask(self.calibrated, self.logit_shape) if self.calibrated is not None else None
        return raw, cal

    @property
    def nbytes(self) -> int:
        return len(self.raw) + (len(self.calibrated) if self.calibrated is not None else 0)


def compress_mask(mask: np.ndarray) -> bytes:
    # Level 1: several times faster than the default and within ~20% of its size on masks.
    return zlib.compress(np.ascontiguousarray(mask, dtype=np.uint8).tobytes(), 1)


def decompress_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    return np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(shape)


def prediction_from_record(record: SegmentationRecord, served_at: float) -> ServedPrediction:
    cal = record.calibrated_decision
    return ServedPrediction(
        request_id=record.request_id,
        model_name=record.model_name,
        model_version=record.model_version,
        num_classes=int(record.logits.shape[0]),
        input_size=(int(record.input_size[0]), int(record.input_size[1])),
        logit_shape=(int(record.raw_decision.shape[0]), int(record.raw_decision.shape[1])),
        raw=compress_mask(record.raw_decision),
        calibrated=compress_mask(cal) if cal is not None else None,
        served_at=served_at,
    )


_PREDICTION = "feedback/prediction/"
_USED = "feedback/used/"


def serialize_prediction(p: ServedPrediction) -> bytes:
    """header JSON, NUL, raw zlib, calibrated zlib (lengths in the header)."""
    head = {
        "request_id": p.request_id,
        "model_name": p.model_name,
        "model_version": p.model_version,
        "num_classes": p.num_classes,
        "input_size": list(p.input_size),
        "logit_shape": list(p.logit_shape),
        "raw": len(p.raw),
        "calibrated": None if p.calibrated is None else len(p.calibrated),
        "served_at": p.served_at,
    }
    return json.dumps(head, separators=(",", ":")).encode() + b"\0" + p.raw + (p.calibrated or b"")


def deserialize_prediction(data: bytes) -> ServedPrediction:
    head_bytes, _, rest = data.partition(b"\0")
    head = json.loads(head_bytes)
    raw_len = int(head["raw"])
    cal_len = head["calibrated"]
    return ServedPrediction(
        request_id=head["request_id"],
        model_name=head["model_name"],
        model_version=head["model_version"],
        num_classes=int(head["num_classes"]),
        input_size=(int(head["input_size"][0]), int(head["input_size"][1])),
        logit_shape=(int(head["logit_shape"][0]), int(head["logit_shape"][1])),
        raw=rest[:raw_len],
        calibrated=None if cal_len is None else rest[raw_len : raw_len + int(cal_len)],
        served_at=float(head["served_at"]),
    )


class FeedbackStore:
    """Request id -> :class:`ServedPrediction` in the shared state (:mod:`service.state`), for ``ttl_s``.

    The default state is this process's own :class:`~service.state.MemoryStore` holding at most
    ``max_entries`` predictions (the oldest go first); with ``BLDA_STATE_URL`` every worker and replica
    sees the same predictions, and TTLs bound them. An id that received feedback leaves a marker until it
    expires, so that a second feedback gets "already given" rather than "unknown". Request ids are the
    server's own (service.request_id), so clients cannot collide.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        state: StateStore | None = None,
    ):
        if max_entries < 1:
            raise ValueError(f"expected max_entries >= 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"expected ttl_s > 0, got {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._memory = MemoryStore(max_entries, clock) if state is None else None
        self.state: StateStore = state if state is not None else self._memory  # type: ignore[assignment]

    def __len__(self) -> int:
        """Predictions awaiting feedback (in-process state only)."""
        return len(self._own().keys(_PREDICTION))

    @property
    def evicted(self) -> int:
        return self._own().evicted

    @property
    def nbytes(self) -> int:
        memory = self._own()
        return sum(len(memory.get(key) or b"") for key in memory.keys(_PREDICTION))

    def _own(self) -> MemoryStore:
        if self._memory is None:
            raise TypeError("sizes are known for the in-process store only")
        return self._memory

    def observe(self, record: SegmentationRecord) -> None:
        """Keep what this request served (called before the response is sent)."""
        self.put(prediction_from_record(record, self._clock()))

    def put(self, prediction: ServedPrediction) -> None:
        self.state.put(_PREDICTION + prediction.request_id, serialize_prediction(prediction), self.ttl_s)

    def peek(self, request_id: str) -> ServedPrediction:
        """The prediction of request_id, without claiming it; FeedbackError if it cannot take feedback."""
        data = self.state.get(_PREDICTION + request_id)
        if data is None:
            raise self._missing(request_id)
        return deserialize_prediction(data)

    def claim(self, request_id: str) -> ServedPrediction:
        """Take the prediction for feedback: of concurrent claims (any worker, any replica) one wins."""
        data = self.state.take(_PREDICTION + request_id)
        if data is None:
            raise self._missing(request_id)
        self.state.put(_USED + request_id, b"1", self.ttl_s)
        return deserialize_prediction(data)

    def _missing(self, request_id: str) -> FeedbackError:
        if self.state.get(_USED + request_id) is not None:
            return FeedbackError(request_id, "used", f"request {request_id!r} already received feedback")
        return FeedbackError(
            request_id,
            "unknown",
            f"expected the X-Request-Id of a request served in the last {self.ttl_s:g} s, "
            f"got unknown or expired {request_id!r}",
        )


def decode_mask(data: bytes, input_size: tuple[int, int], num_classes: int) -> np.ndarray:
    """PNG bytes -> (H, W) uint8 class ids (255 = ignore), checked against the served image's size.

    Accepts 8-bit single-channel PNGs: greyscale (mode L) or palette (mode P, whose pixel values are the
    ids, as in the masks the service returns). The size is checked from the header, before decoding.
    """
    height, width = input_size
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except (OSError, SyntaxError, ValueError) as exc:
        raise MaskError(f"mask: expected a PNG image of class ids, got undecodable bytes ({exc})") from exc
    if image.size != (width, height):
        raise MaskError(
            f"mask: expected {width} x {height} pixels (the size of the served image), "
            f"got {image.size[0]} x {image.size[1]}"
        )
    if image.mode not in ("L", "P"):
        raise MaskError(
            f"mask: expected an 8-bit single-channel PNG (mode L or P) of class ids, got mode {image.mode}"
        )
    try:
        mask = np.asarray(image)  # (H, W) uint8; decodes
    except (OSError, SyntaxError, ValueError) as exc:
        raise MaskError(f"mask: expected a PNG image of class ids, got a corrupted one ({exc})") from exc
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(num_classes), IGNORE_INDEX])
    if bad.size:
        raise MaskError(
            f"mask: expected class ids 0..{num_classes - 1} or {IGNORE_INDEX} (ignore), "
            f"got {bad[:10].tolist()}"
        )
    return mask


def feedback_confusion(prediction: ServedPrediction, truth: np.ndarray) -> np.ndarray:
    """(2, C, C) int64 [decision (raw, calibrated), true, predicted] at the input resolution.

    The decisions are resized to the image as the served mask was; the calibrated slice is all zeros
    when calibration did not run for that request.
    """
    height, width = prediction.input_size
    c = prediction.num_classes
    raw, cal = prediction.decisions()
    out = np.zeros((2, c, c), np.int64)
    out[0] = confusion_matrix(resize_nearest(raw, height, width), truth, c, IGNORE_INDEX)
    if cal is not None:
        out[1] = confusion_matrix(resize_nearest(cal, height, width), truth, c, IGNORE_INDEX)
    return out
