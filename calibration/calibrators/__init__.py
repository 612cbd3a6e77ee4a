"""Classical corrections of class bias beside BLDA's alignment: logit adjustment, EM prior re-estimation,
bias-corrected temperature scaling (alone and before EM), BLDA and BLDA + EM prior (see calibrator.py)."""

from calibration.calibrators.calibrator import (
    CALIBRATOR_NAMES,
    LEGACY_NAMES,
    Calibrator,
    calibrator_probabilities,
    decide_calibrator,
)

__all__ = ["CALIBRATOR_NAMES", "LEGACY_NAMES", "Calibrator", "calibrator_probabilities", "decide_calibrator"]
