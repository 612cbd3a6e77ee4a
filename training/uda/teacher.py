"""Exponential-moving-average teacher (a small standalone module, after timm's ModelEmaV2)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_alpha(iteration: int, alpha: float) -> float:
    """Ramp (DACS): the teacher follows the student closely at first, at most `alpha`."""
    return min(1.0 - 1.0 / (iteration + 1), alpha)


class EmaTeacher:
    """Holds a frozen copy of the student; `update` blends the student's parameters and buffers in."""

    def __init__(self, student: nn.Module) -> None:
        self.module = copy.deepcopy(student)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, alpha: float) -> None:
        for p, s in zip(self.module.parameters(), student.parameters(), strict=True):
            p.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        for t, sb in zip(self.module.buffers(), student.buffers(), strict=True):
            if t.dtype.is_floating_point:
                t.mul_(alpha).add_(sb.detach(), alpha=1.0 - alpha)
            else:
                t.copy_(sb)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_stats: bool = False) -> torch.Tensor:
        """(N, 3, H, W) -> teacher logits (N, C, h, w), in eval mode; with `batch_stats` BatchNorm normalises
        with the batch's own statistics (the target batch's, not the running ones the student gathered
        mostly on source), leaving the running statistics untouched."""
        self.module.eval()
        if not batch_stats:
            return self.module(images).logits
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in norms]
        for m in norms:
            m.train()
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        try:
            return self.module(images).logits
        finally:
            for m, momentum in zip(norms, saved, strict=True):
                m.momentum = momentum
                m.eval()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
