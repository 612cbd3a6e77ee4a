"""Losses of the training step: (corrected) pixel-weighted cross-entropy and the CDF-head L1 loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibration.labels import IGNORE_INDEX


def weighted_cross_entropy(
    logits: torch.Tensor,  # (N, C, H, W)
    labels: torch.Tensor,  # (N, H, W) int, IGNORE_INDEX ignored
    weights: torch.Tensor | None = None,  # (N, H, W) per-pixel weights (pseudo-label confidence)
) -> torch.Tensor:
    """Mean over all non-ignored pixels of w · CE (DACS: ignored pixels count in neither sum)."""
    per_pixel = F.cross_entropy(
        logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (N, H, W)
    valid = (labels != IGNORE_INDEX).to(logits.dtype)
    if weights is not None:
        per_pixel = per_pixel * weights
    return per_pixel.sum() / valid.sum().clamp_min(1.0)


def corrected_logits(
    logits: torch.Tensor,  # (N, C, h, w)
    delta: torch.Tensor,  # (N, C, h, w): Δ_{y,l}(z_l)
    t: float = 0.1,
) -> torch.Tensor:
    """z − t·Δ(z) with Δ a constant (no gradient): the logits a corrected loss sees."""
    return logits - t * delta.detach()


def corrected_cross_entropy(
    logits: torch.Tensor,  # (N, C, H, W)
    labels: torch.Tensor,  # (N, H, W)
    delta: torch.Tensor,  # (N, C, H, W): Δ_{y,l}(z_l), treated as a constant
    t: float = 0.1,
    weights: torch.Tensor | None = None,  # (N, H, W)
) -> torch.Tensor:
    """CE(z − t·Δ(z), y): a logit-adjusted loss, so that the raw logits come out balanced."""
    return weighted_cross_entropy(corrected_logits(logits, delta, t), labels, weights)


def cdf_loss(
    cdf: torch.Tensor,  # (N, 1, H, W) predicted F_yy(z_y) in (0, 1)
    target: torch.Tensor,  # (N, H, W) F_yy(z_y) from the GMMs, no gradient
    valid: torch.Tensor,  # (N, H, W) bool
) -> torch.Tensor:
    """L1 between the auxiliary head and the quantile of the pixel's own-class logit."""
    diff = (cdf[:, 0] - target.detach()).abs() * valid.to(cdf.dtype)
    return diff.sum() / valid.sum().clamp_min(1).to(cdf.dtype)
