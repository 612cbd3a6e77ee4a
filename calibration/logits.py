"""Is this array logits? Probabilities and log-probabilities are refused where logits are expected.

The calibration acts on logits (the shift tables are functions of raw scores); fed softmax outputs or
log-softmax outputs it fits tables that mean nothing, silently. The telltales are exact, not a guess from
the range alone: every pixel's C values sum to 1 and lie in [0, 1] (probabilities), or are all <= 0 and
their exponentials sum to 1 (log-probabilities). Real logits meet neither on every pixel.
"""

from __future__ import annotations

import numpy as np

# Sums are compared with this slack: float16 probabilities of 19 classes sum to 1 within about 1e-2.
SUM_TOLERANCE = 2e-2


def log_softmax(u: np.ndarray, axis: int = 0) -> np.ndarray:
    """Plain numpy, the core's one softmax: scipy.special.log_softmax goes through its array-API
    dispatch, which looks torch up in sys.modules and fails where a torch-free process has blocked it
    (`blda bundle create`'s tests run so)."""
    m = u.max(axis=axis, keepdims=True)
    shifted = u - m
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(u: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.exp(log_softmax(u, axis))


class NotLogitsError(ValueError):
    """Probabilities or log-probabilities where logits were expected; str() says how it was told."""


def not_logits_reason(values: np.ndarray, channel_axis: int = 1) -> str | None:
    """Why ``values`` (the classes along ``channel_axis``) are not logits, or None when they may be."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0 or a.shape[channel_axis] < 2:
        return None
    sums = a.sum(axis=channel_axis)
    if a.min() >= 0.0 and a.max() <= 1.0 and np.abs(sums - 1.0).max() <= SUM_TOLERANCE:
        return (
            "got probabilities: every value is in [0, 1] and every pixel's values sum to 1 "
            f"(max |sum - 1| = {np.abs(sums - 1.0).max():.2g}); give the scores before the softmax"
        )
    if a.max() <= 0.0:
        exp_sums = np.exp(a).sum(axis=channel_axis)
        if np.abs(exp_sums - 1.0).max() <= SUM_TOLERANCE:
            return (
                "got log-probabilities: every value is <= 0 and every pixel's exp(values) sum to 1 "
                f"(max |sum - 1| = {np.abs(exp_sums - 1.0).max():.2g}); give the scores before the log-softmax"
            )
    return None


def check_logits(values: np.ndarray, channel_axis: int = 1, what: str = "logits") -> None:
    """Raise NotLogitsError when ``values`` are probabilities or log-probabilities."""
    reason = not_logits_reason(values, channel_axis)
    if reason is not None:
        raise NotLogitsError(f"expected {what} (unnormalised scores), {reason}")
