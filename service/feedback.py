"""Served predictions kept for a while, so that a client can send the ground truth back.

``POST /v1/feedback`` needs the decisions the service made for a request id. They are kept here at the
logit resolution, zlib-compressed (a palette-like uint8 mask compresses 10-50x), under two bounds: at
most ``max_entries`` predictions (the oldest go first) and for at most ``ttl_s`` seconds.

The store is per process. With several workers or replicas, a feedback request must reach the process
that served the image; the service tells the client which by nothing more than the connection, so
clients keep their HTTP connection (keep-alive) between the segmentation and the feedback, and load
balancers route with affinity (sticky sessions). A shared store (Redis, a volume) would lift that
limit at the cost of a dependency and a write per request; an opaque token carrying the decision back
to the client would cost response size and a signing key (unsigned decisions could be forged to
poison the confusion counts). See deploy/README.md.
"""

from __future__ import annotations

import io
import threading
import time
import zlib
from collections import OrderedDict
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


class FeedbackStore:
    """Bounded, expiring map request id -> :class:`ServedPrediction`; thread-safe.

    An id that received feedback stays (without its masks) until it expires, so that a second feedback
    gets "already given" rather than "unknown".
    """

    def __init__(
        self, max_entries: int = 10_000, ttl_s: float = 900.0, clock: Callable[[], float] = time.monotonic
    ):
        if max_entries < 1:
            raise ValueError(f"expected max_entries >= 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"expected ttl_s > 0, got {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is serving order: the oldest entries are at the front.
        self._entries: OrderedDict[str, ServedPrediction] = OrderedDict()
        self._used: OrderedDict[str, float] = OrderedDict()  # request id -> served_at
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._entries.values())

    def observe(self, record: SegmentationRecord) -> None:
        """A segmentation observer: keep what this request served."""
        self.put(prediction_from_record(record, self._clock()))

    def put(self, prediction: ServedPrediction) -> None:
        with self._lock:
            self._expire(self._clock())
            self._entries[prediction.request_id] = prediction
            self._entries.move_to_end(prediction.request_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evicted += 1

    def peek(self, request_id: str) -> ServedPrediction:
        """The prediction of request_id, without claiming it; FeedbackError if it cannot take feedback."""
        with self._lock:
            return self._find(request_id)

    def claim(self, request_id: str) -> ServedPrediction:
        """Take the prediction for feedback: a second claim of the same id raises FeedbackError('used')."""
        with self._lock:
            prediction = self._find(request_id)
            del self._entries[request_id]
            self._used[request_id] = prediction.served_at
            return prediction

    def _find(self, request_id: str) -> ServedPrediction:
        now = self._clock()
        self._expire(now)
        if request_id in self._used:
            raise FeedbackError(request_id, "used", f"request {request_id!r} already received feedback")
        prediction = self._entries.get(request_id)
        if prediction is None:
            raise FeedbackError(
                request_id,
                "unknown",
                f"expected the id of a request served by this process in the last {self.ttl_s:g} s "
                f"(at most {self.max_entries} are kept), got unknown or expired {request_id!r}",
            )
        return prediction

    def _expire(self, now: float) -> None:
        horizon = now - self.ttl_s
        while self._entries and next(iter(self._entries.values())).served_at <= horizon:
            self._entries.popitem(last=False)
        while self._used and next(iter(self._used.values())) <= horizon:
            self._used.popitem(last=False)
        while len(self._used) > self.max_entries:
            self._used.popitem(last=False)


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
