"""Bias-corrected temperature scaling (Alexandari et al., 2020): a temperature T > 0 and per-class biases b
fitted by the negative log-likelihood of softmax(z / T + b) on labelled source-validation logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from calibration.logits import log_softmax


@dataclass(frozen=True)
class Bcts:
    temperature: float
    bias: np.ndarray  # (C,) zero-mean (softmax ignores a common shift)
    nll: float  # mean NLL at the fit
    iterations: int


def bcts_nll(logits: np.ndarray, labels: np.ndarray, temperature: float, bias: np.ndarray) -> float:
    """Mean NLL of softmax(z / T + b) for logits (C, N) and labels (N,)."""
    u = np.asarray(logits, np.float64) / temperature + np.asarray(bias, np.float64)[:, None]
    return float(-log_softmax(u, axis=0)[labels, np.arange(labels.size)].mean())


def fit_bcts(logits: np.ndarray, labels: np.ndarray, max_iter: int = 500) -> Bcts:
    """logits (C, N), labels (N,) in [0, C) -> the (T, b) of least mean NLL, by L-BFGS on (log T, b) with
    the analytic gradient (log T keeps T > 0)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[1] != y.size or y.size == 0:
        raise ValueError(f"expected logits (C, N) and labels (N,) with N > 0, got {z.shape} and {y.shape}")
    c, n = z.shape
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels: expected values in [0, {c}), got [{y.min()}, {y.max()}]")
    onehot = np.zeros((c, n))
    onehot[y, np.arange(n)] = 1.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = np.exp(theta[0])
        u = z / t + theta[1:, None]  # (C, N)
        logp = log_softmax(u, axis=0)
        value = -float(logp[y, np.arange(n)].mean())
        du = (np.exp(logp) - onehot) / n  # dL/du (C, N)
        grad_t = float(np.sum(du * (-z / t)))  # dL/dlogT = dL/du . du/dlogT, du/dlogT = -z / T
        return value, np.concatenate([[grad_t], du.sum(axis=1)])

    result = minimize(loss, np.zeros(c + 1), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    bias = result.x[1:] - result.x[1:].mean()
    temperature = float(np.exp(result.x[0]))
    return Bcts(temperature, bias, bcts_nll(z, y, temperature, bias), int(result.nit))
