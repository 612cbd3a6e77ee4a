"""Probabilities and log-probabilities are told from logits by exact telltales, not by range alone."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.logits import NotLogitsError, check_logits, not_logits_reason

rng = np.random.default_rng(0)
SCORES = rng.normal(0, 2, (2, 7, 5, 6))  # (N, C, H, W)
PROBS = np.exp(SCORES) / np.exp(SCORES).sum(axis=1, keepdims=True)


def test_probabilities_and_log_probabilities_are_refused() -> None:
    assert "got probabilities" in (not_logits_reason(PROBS) or "")
    assert "got log-probabilities" in (not_logits_reason(np.log(PROBS)) or "")
    # (C, P) layout: the classes on axis 0.
    assert "got probabilities" in (not_logits_reason(PROBS[0].reshape(7, -1), channel_axis=0) or "")
    with pytest.raises(NotLogitsError, match=r"expected logits \(unnormalised scores\), got probabilities"):
        check_logits(PROBS)


def test_logits_pass_even_in_the_ranges_of_probabilities() -> None:
    assert not_logits_reason(SCORES) is None
    # In [0, 1] but not summing to 1; all negative but exp-sums not 1: logits that merely look small.
    assert not_logits_reason(rng.uniform(0, 1, (2, 7, 5, 6))) is None
    assert not_logits_reason(-rng.uniform(0, 3, (2, 7, 5, 6))) is None
    # A probability map on most pixels but not all is not a probability map.
    mixed = PROBS.copy()
    mixed[0, :, 0, 0] = 0.9
    assert not_logits_reason(mixed) is None
    check_logits(SCORES)
