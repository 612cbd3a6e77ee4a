"""Confidence-weighted pseudo-labels from the teacher (DACS), optionally BLDA-corrected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class PseudoLabels:
    labels: torch.Tensor  # (N, H, W) int64
    weight: float  # fraction of confident pixels over all processes (DACS' pseudo-label weight)
    confidence: torch.Tensor  # (N, H, W) max probability
    class_counts: torch.Tensor  # (C,) float64 pseudo-label histogram over all processes


def pseudo_labels_from_probs(
    probs: torch.Tensor,  # (N, C, H, W) class probabilities (softmax, or the calibrated scores)
    threshold: float,
    reduce: Reduce = _identity,
) -> PseudoLabels:
    """argmax labels; weight = share of pixels with confidence > threshold, all-reduced so that every
    process weights its target loss the same (as one process on the union of the batches would)."""
    confidence, labels = probs.max(dim=1)  # (N, H, W)
    num_classes = probs.shape[1]
    stats = torch.stack(
        [
            (confidence > threshold).sum().double(),
            torch.tensor(float(confidence.numel()), dtype=torch.float64, device=confidence.device),
        ]
    )
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).double()
    total = reduce(torch.cat([stats, counts]))
    weight = float(total[0] / total[1].clamp_min(1.0))
    return PseudoLabels(labels=labels, weight=weight, confidence=confidence, class_counts=total[2:])


def teacher_probabilities(
    logits: torch.Tensor,  # (N, C, h, w) teacher logits
    size: tuple[int, int],
    scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Probabilities at the label resolution: softmax of the logits, or `scores(logits)` (the BLDA-corrected
    rule on the target GMMs), upsampled bilinearly like the logits."""
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=1) if scores is None else scores(logits)
        if probs.shape[-2:] != size:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return probs
