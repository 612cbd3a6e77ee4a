"""Fitting every calibrator, and choosing each one's strength and the bundle's default on the tuning split.

Each fitter is a pure function of the fit inputs and the calibrators fitted before it (bcts-em starts from
bcts, blda+em-prior from blda): a plain dict in CALIBRATOR_NAMES order. Strengths (τ of logit adjustment
and of BLDA) are chosen by tuning-split mIoU with the rule that sets BLDA's τ in `blda export`
(calibration.bias.calibration_default); the default calibrator is the one of best tuning mIoU, "none"
unless another beats it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.alignment import ShiftTables
from calibration.bias import calibration_default
from calibration.calibrators.calibrator import CALIBRATOR_NAMES, Calibrator, calibrator_probabilities
from calibration.calibrators.evaluation import LogitImage, calibrator_confusion
from calibration.calibrators.priors import (
    estimate_target_priors,
    logit_adjustment,
    normalise,
    prior_offset,
)
from calibration.calibrators.temperature import fit_bcts

LOGIT_ADJUST_TAUS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
BLDA_TAUS: tuple[float, ...] = (0.1, 0.2, 0.4)


@dataclass(frozen=True)
class FitInputs:
    source_priors: np.ndarray  # (C,) from the source training labels
    target_logits: np.ndarray  # (C, P) unlabelled target-train pixels (EM)
    source_val_logits: np.ndarray  # (C, N) labelled source-val pixels (BCTS)
    source_val_labels: np.ndarray  # (N,)
    tuning: Sequence[LogitImage]  # labelled target tuning images (every strength choice)
    shifts: ShiftTables | None = None  # BLDA's serving tables; None: no blda calibrators
    logit_adjust_taus: Sequence[float] = LOGIT_ADJUST_TAUS
    blda_taus: Sequence[float] = BLDA_TAUS
    em_max_iter: int = 100

    @property
    def num_classes(self) -> int:
        return int(self.source_priors.shape[0])


Fitted = dict[str, Calibrator]


def _by_tuning(inputs: FitInputs, make: Callable[[float], Calibrator], taus: Sequence[float]) -> Calibrator:
    """The strength of best tuning mIoU among `taus`, with every score recorded."""
    c = inputs.num_classes
    raw = calibrator_confusion(inputs.tuning, Calibrator("none"), None, c)
    confs = {float(t): calibrator_confusion(inputs.tuning, make(t), inputs.shifts, c) for t in taus}
    choice = calibration_default(raw, confs)
    tau = choice["tau"]
    assert isinstance(tau, float)  # calibration_default returns the τ as a float
    best = make(tau)
    fit = {**best.fit, "tuning_miou_by_tau": choice["calibrated_miou"], "tuning_raw_miou": choice["raw_miou"]}
    return Calibrator(best.name, best.temperature, best.bias, best.tau, fit)


def _em(inputs: FitInputs, probs: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    est = estimate_target_priors(probs, inputs.source_priors, max_iter=inputs.em_max_iter)
    info = {
        "target_priors": est.priors.tolist(),
        "source_priors": normalise(inputs.source_priors).tolist(),
        "em_iterations": est.iterations,
        "em_converged": est.converged,
        "em_pixels": int(probs.shape[1]),
    }
    return prior_offset(est.priors, inputs.source_priors), info


def fit_none(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    return Calibrator("none")


def fit_logit_adjust(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    def make(tau: float) -> Calibrator:
        return Calibrator(
            "logit-adjust", bias=logit_adjustment(inputs.source_priors, tau), fit={"strength": tau}
        )

    return _by_tuning(inputs, make, inputs.logit_adjust_taus)


def fit_em_prior(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    probs = calibrator_probabilities(inputs.target_logits, Calibrator("none"))
    bias, info = _em(inputs, probs)
    return Calibrator("em-prior", bias=bias, fit=info)


def fit_bcts_alone(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    res = fit_bcts(inputs.source_val_logits, inputs.source_val_labels)
    info = {"source_val_nll": res.nll, "source_val_pixels": int(inputs.source_val_labels.size)}
    return Calibrator("bcts", temperature=res.temperature, bias=res.bias, fit=info)


def fit_bcts_em(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    bcts = fitted["bcts"] if "bcts" in fitted else fit_bcts_alone(inputs, fitted)
    probs = calibrator_probabilities(inputs.target_logits, bcts)
    offset, info = _em(inputs, probs)
    assert bcts.bias is not None
    return Calibrator("bcts-em", bcts.temperature, bcts.bias + offset, fit={**bcts.fit, **info})


def fit_blda(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    return _by_tuning(inputs, lambda tau: Calibrator("blda", tau=tau), inputs.blda_taus)


def fit_blda_em(inputs: FitInputs, fitted: Fitted) -> Calibrator:
    blda = fitted["blda"] if "blda" in fitted else fit_blda(inputs, fitted)
    em = fitted["em-prior"] if "em-prior" in fitted else fit_em_prior(inputs, fitted)
    # The target prior is EM's on the model's own posteriors (trained under π_s, as Saerens' EM assumes);
    # it enters every hypothesis of BLDA's rule at BLDA's τ. EM on BLDA's normalised hypothesis scores
    # instead collapsed (default benchmark, source-only: val mIoU 8.6, ECE 64%): those scores are not
    # posteriors under the source prior.
    return Calibrator("blda+em-prior", bias=em.bias, tau=blda.tau, fit={"tau_from": "blda", **em.fit})


FITTERS: dict[str, Callable[[FitInputs, Fitted], Calibrator]] = {
    "none": fit_none,
    "logit-adjust": fit_logit_adjust,
    "em-prior": fit_em_prior,
    "bcts": fit_bcts_alone,
    "bcts-em": fit_bcts_em,
    "blda": fit_blda,
    "blda+em-prior": fit_blda_em,
}
assert tuple(FITTERS) == CALIBRATOR_NAMES
TABLE_CALIBRATORS = frozenset({"blda", "blda+em-prior"})


def parse_names(text: str | Sequence[str], with_tables: bool = True) -> list[str]:
    """ "none,blda" (or a list) -> names in CALIBRATOR_NAMES order; "all" is every one (the table ones only
    `with_tables`). Unknown names list the options."""
    items = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if items == ["all"]:
        items = [n for n in CALIBRATOR_NAMES if with_tables or n not in TABLE_CALIBRATORS]
    unknown = [n for n in items if n not in FITTERS]
    if unknown or not items:
        raise ValueError(f"calibrators: expected names among {list(CALIBRATOR_NAMES)} or 'all', got {items}")
    if not with_tables and (needs := [n for n in items if n in TABLE_CALIBRATORS]):
        raise ValueError(f"calibrators {needs}: expected calibration tables, got none")
    return [n for n in CALIBRATOR_NAMES if n in items]


def fit_calibrators(inputs: FitInputs, names: Sequence[str]) -> Fitted:
    """name -> fitted Calibrator for each of `names` (parse_names order)."""
    wanted = parse_names(names, inputs.shifts is not None)
    fitted: Fitted = {}
    # In CALIBRATOR_NAMES order: bcts before bcts-em, blda before blda+em-prior (each reuses the other).
    for name in wanted:
        fitted[name] = FITTERS[name](inputs, fitted)
    return {n: fitted[n] for n in wanted}


def choose_default(rows: Sequence[dict[str, Any]]) -> str:
    """The calibrator of best tuning mIoU (rows of evaluation.table_row); "none" wins ties."""
    scored = [(r["miou"] if r["miou"] is not None else -1.0, r["calibrator"] == "none", r) for r in rows]
    if not scored:
        return "none"
    return max(scored, key=lambda s: (s[0], s[1]))[2]["calibrator"]
