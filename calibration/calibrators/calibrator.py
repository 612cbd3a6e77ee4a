"""A fitted calibrator: the parameters every correction of class bias reduces to, its probabilities and its
decision (through the one decision pipeline, calibration.segmentation.decide).

Every correction here is (T, b, τ):
- without tables (τ None): probabilities softmax(z / T + b); the decision argmax(z / T + b) =
  argmax(z + T b), one add before the argmax. none: T = 1, b = 0; logit-adjust: b = -τ_la log π_s;
  em-prior: b = log(π_t / π_s); bcts: BCTS's (T, b); bcts-em: BCTS then b += log(π_t / π_s);
- with tables (τ set, T = 1): BLDA's rule argmax_c softmax_l(z_l + τΔ_cl(z_l) + b_l)[c]; blda: b = 0;
  blda+em-prior: b = log(π_t / π_s) inside every hypothesis's softmax. Their probabilities are the
  hypotheses' own-class scores s_c normalised over c (what the rule ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.alignment import ShiftTables, shift_values
from calibration.logits import softmax
from calibration.segmentation import DEFAULT_BAND_PIXELS, Decisions, decide

# Every calibrator a bundle can carry, in the order tables list them.
CALIBRATOR_NAMES: tuple[str, ...] = (
    "none",
    "logit-adjust",
    "em-prior",
    "bcts",
    "bcts-em",
    "blda",
    "blda+em-prior",
)
# What a bundle without a calibrators file serves (schema-1 bundles such as models/blda-synth/2.0.0).
LEGACY_NAMES: tuple[str, ...] = ("none", "blda")


@dataclass(frozen=True)
class Calibrator:
    name: str
    temperature: float = 1.0
    bias: np.ndarray | None = None  # (C,) b; None: zeros
    tau: float | None = None  # BLDA's strength; None: the shift tables are not used
    fit: dict[str, Any] = field(default_factory=dict)  # what was fitted and chosen (priors, τ scores)

    def __post_init__(self) -> None:
        if self.name not in CALIBRATOR_NAMES:
            raise ValueError(f"calibrator: expected one of {list(CALIBRATOR_NAMES)}, got {self.name!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if self.tau is not None and self.temperature != 1.0:
            raise ValueError("temperature: expected 1 for a calibrator on the shift tables")

    @property
    def uses_tables(self) -> bool:
        return self.tau is not None

    def with_tau(self, tau: float) -> Calibrator:
        """The same calibrator at another BLDA strength (a request's tau); unchanged without tables."""
        if self.tau is None or float(tau) == self.tau:
            return self
        return Calibrator(self.name, self.temperature, self.bias, float(tau), self.fit)

    def decision_offset(self, num_classes: int) -> np.ndarray | None:
        """(C,) what the decision adds: T b without tables (argmax(z / T + b) = argmax(z + T b)), b with."""
        if self.bias is None or not np.any(self.bias):
            return None
        b = np.asarray(self.bias, np.float32)
        if b.shape != (num_classes,):
            raise ValueError(f"{self.name}: expected a bias of shape ({num_classes},), got {b.shape}")
        return b if self.uses_tables else np.float32(self.temperature) * b


def calibrator_probabilities(
    logits: np.ndarray,  # (C, P) logits of pixels
    calibrator: Calibrator,
    shifts: ShiftTables | None = None,
) -> np.ndarray:
    """(C, P) float64 class probabilities the calibrator yields (see the module docstring)."""
    z = np.asarray(logits, dtype=np.float64)
    c = z.shape[0]
    b = np.zeros(c) if calibrator.bias is None else np.asarray(calibrator.bias, np.float64)
    if not calibrator.uses_tables:
        return softmax(z / calibrator.temperature + b[:, None], axis=0)
    if shifts is None:
        raise ValueError(f"{calibrator.name}: expected shift tables, got none")
    assert calibrator.tau is not None
    out = np.empty_like(z)
    step = 8192  # (C, C, step) work arrays
    for s in range(0, z.shape[1], step):
        zs = z[:, s : s + step]
        aligned = zs[None] + calibrator.tau * shift_values(zs.astype(np.float32), shifts) + b[None, :, None]
        own = softmax(aligned, axis=1)[np.arange(c), np.arange(c)]  # (C, p): s_c of hypothesis c
        out[:, s : s + step] = own / own.sum(axis=0, keepdims=True)
    return out


def decide_calibrator(
    logits: np.ndarray,  # (C, h, w)
    size: tuple[int, int],
    calibrator: Calibrator,
    shifts: ShiftTables | None = None,
    band_pixels: int = DEFAULT_BAND_PIXELS,
) -> Decisions:
    """Raw decision and the calibrator's (calibrated[0]); "none" yields the raw decision as calibrated.
    The service, `blda predict` and `blda evaluate` decide through this."""
    c = int(np.shape(logits)[0])
    if calibrator.uses_tables and (calibrator.tau or 0.0) > 0:
        if shifts is None:
            raise ValueError(f"{calibrator.name}: expected shift tables, got none")
        assert calibrator.tau is not None
        return decide(
            logits, size, shifts, (calibrator.tau,), band_pixels, offset=calibrator.decision_offset(c)
        )
    # Without tables, or at τ = 0 where they drop out: b alone (T b without tables).
    offset = calibrator.decision_offset(c)
    if offset is None:
        made = decide(logits, size, band_pixels=band_pixels)
        return Decisions(made.raw, made.raw_logit, (made.raw,), (made.raw_logit,))
    return decide(logits, size, band_pixels=band_pixels, offset=offset)
