"""What one segmentation request produced, for whoever observes the service (metrics, feedback, logs).

The segment route builds one :class:`SegmentationRecord` per successful request and hands it to every
observer in ``app.state.segmentation_observers`` after the response is sent, off the event loop. An
observer that raises is logged and skipped; it never fails a request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from calibration.tables import CalibrationTables


@dataclass(frozen=True)
class StageTimings:
    """Seconds spent per stage, wall clock as the request saw it (queueing included)."""

    decode: float = 0.0
    infer: float = 0.0
    calibrate: float = 0.0
    encode: float = 0.0

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value (milliseconds)."""
        return ", ".join(
            f"{name};dur={seconds * 1000:.2f}"
            for name, seconds in (
                ("decode", self.decode),
                ("infer", self.infer),
                ("calibrate", self.calibrate),
                ("encode", self.encode),
            )
        )


@dataclass(frozen=True)
class SegmentationRecord:
    request_id: str
    model_name: str
    model_version: str
    # Decisions are at the decision size (h, w) (calibration.segmentation: logits upsampled bilinearly),
    # before the nearest resize to the input; each of their pixels stands for the input pixels it becomes.
    raw_decision: np.ndarray  # (h, w) uint8: argmax of the upsampled logits
    calibrated_decision: np.ndarray | None  # (h, w) uint8, None when calibration did not run
    winning_logits: np.ndarray  # (h, w) float32: the (upsampled) logit of the raw decision's class
    logits: np.ndarray  # (C, h', w') float32, read-only: the model's logits (h', w' may differ from h, w)
    tables: CalibrationTables | None  # the served version's tables, for quantiles of the logits
    input_size: tuple[int, int]  # (H, W) of the uploaded image
    calibrate: bool
    tau: float
    timings: StageTimings = field(default_factory=StageTimings)
    # (h, w) float32: the (upsampled) logit of the calibrated decision's class; None: take it from
    # ``logits``, which must then be at the decision size.
    calibrated_logits: np.ndarray | None = None
    # False: the client opted out of live recalibration's traffic sample (``record=false``).
    record: bool = True
    # The bundle's calibrator of the served decision ("" when not recorded: "blda" if calibrate else "none").
    calibrator: str = ""

    @property
    def calibrator_name(self) -> str:
        return self.calibrator or ("blda" if self.calibrate else "none")

    @property
    def served_decision(self) -> np.ndarray:
        """(h, w) uint8: what the client got (before resizing)."""
        return self.calibrated_decision if self.calibrated_decision is not None else self.raw_decision


SegmentationObserver = Callable[[SegmentationRecord], None]
