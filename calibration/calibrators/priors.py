"""Class priors: logit adjustment with the source priors (Menon et al., 2021) and target-prior
re-estimation by EM on unlabelled target posteriors (Saerens et al., 2002). Pure functions on arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Priors are floored here before any log: a class absent from the source labels would otherwise get an
# infinite offset (and win, or lose, every pixel).
PRIOR_FLOOR = 1e-6


def class_priors(counts: np.ndarray) -> np.ndarray:
    """(C,) or (N, C) pixel counts -> (C,) float64 priors summing to 1, floored at PRIOR_FLOOR."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 2:
        counts = counts.sum(axis=0)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"expected class counts of shape (C,) or (N, C) with C >= 2, got {counts.shape}")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("expected non-negative class counts with a positive total, got none or negatives")
    return normalise(counts / counts.sum())


def normalise(priors: np.ndarray) -> np.ndarray:
    """(C,) -> (C,) floored at PRIOR_FLOOR and summing to 1."""
    p = np.maximum(np.asarray(priors, dtype=np.float64), PRIOR_FLOOR)
    return p / p.sum()


def logit_adjustment(source_priors: np.ndarray, tau: float) -> np.ndarray:
    """(C,) per-class offset -τ log π_source added to the logits (post-hoc logit adjustment): classes
    frequent in the source lose what their prior gave them."""
    if tau < 0:
        raise ValueError(f"tau: expected >= 0, got {tau}")
    return -float(tau) * np.log(normalise(source_priors))


def prior_offset(target_priors: np.ndarray, source_priors: np.ndarray) -> np.ndarray:
    """(C,) log(π_t / π_s): Bayes' rule moves source posteriors to the target prior by this offset on the
    log-probabilities (equivalently on logits, the softmax's normaliser cancels)."""
    return np.log(normalise(target_priors)) - np.log(normalise(source_priors))


@dataclass(frozen=True)
class PriorEstimate:
    priors: np.ndarray  # (C,) estimated target priors
    iterations: int
    converged: bool


def estimate_target_priors(
    probs: np.ndarray,  # (C, P) posteriors p_s(y|x) of unlabelled target pixels, columns sum to 1
    source_priors: np.ndarray,  # (C,) the prior those posteriors were trained under
    max_iter: int = 100,
    tol: float = 1e-6,
) -> PriorEstimate:
    """Saerens et al. (2002): π^(k+1) = mean_x p_k(y|x), p_k(y|x) ∝ p_s(y|x) π^(k) / π_s, from π^(0) = π_s.

    EM on the likelihood of the unlabelled pixels under the prior: each step cannot lower it, and it stops
    when no prior moves by more than `tol`, or after `max_iter` steps (reported as not converged)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"expected posteriors of shape (C, P) with P > 0, got {probs.shape}")
    if max_iter < 1:
        raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
    source = normalise(source_priors)
    if source.shape != (probs.shape[0],):
        raise ValueError(f"source_priors: expected shape ({probs.shape[0]},), got {source.shape}")
    prior = source.copy()
    for step in range(1, max_iter + 1):
        weighted = probs * (prior / source)[:, None]  # (C, P)
        weighted /= np.maximum(weighted.sum(axis=0, keepdims=True), 1e-300)
        new = normalise(weighted.mean(axis=1))
        moved = float(np.abs(new - prior).max())
        prior = new
        if moved < tol:
            return PriorEstimate(prior, step, True)
    return PriorEstimate(prior, max_iter, False)
