"""What every segmentation network shares: the output type, input normalisation, small conv blocks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

# Per-channel statistics of RGB images scaled to [0, 1] (the ImageNet values; used by training, the
# exported manifest and therefore the service, so one definition only).
IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Networks reduce the input by this factor, rounded up (logits (N, C, ceil(H/4), ceil(W/4))).
OUTPUT_STRIDE = 4


class SegOutput(NamedTuple):
    logits: torch.Tensor  # (N, C, h, w), h = ceil(H / OUTPUT_STRIDE)
    cdf: torch.Tensor  # (N, 1, h, w) in (0, 1): predicted F_yy(z_y) of the pixel's own class


def normalise_images(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, 3) or (H, W, 3) -> float32 network input (N, 3, H, W)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3) or (H, W, 3), got shape {images.shape}")
    mean = np.asarray(IMAGE_MEAN, np.float32) * np.float32(255.0)
    std = np.asarray(IMAGE_STD, np.float32) * np.float32(255.0)
    x = (images.astype(np.float32) - mean) / std  # (N, H, W, 3)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)  # (N, 3, H, W)


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) (numpy or torch) -> normalised float32 tensor (N, 3, H, W)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected (N, H, W, 3), got shape {tuple(images.shape)}")
        mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1)
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
        return (x - mean) / std
    return torch.from_numpy(normalise_images(images))


def output_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the logits for an input of height x width."""
    return -(-height // OUTPUT_STRIDE), -(-width // OUTPUT_STRIDE)


class ConvBNAct(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.Hardswish() if act else nn.Identity(),
        )


class SegHeads(nn.Module):
    """Classifier and auxiliary CDF regressor, both 1x1 convolutions on the same decoder features."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.cdf = nn.Conv2d(channels, 1, 1)
        # Start the CDF head at 0.5, the mean of a uniform quantile.
        nn.init.zeros_(self.cdf.weight)
        if self.cdf.bias is not None:
            nn.init.zeros_(self.cdf.bias)

    def forward(self, features: torch.Tensor) -> SegOutput:  # (N, D, h, w)
        logits = self.classifier(self.dropout(features))  # (N, C, h, w)
        cdf = torch.sigmoid(self.cdf(features))  # (N, 1, h, w)
        return SegOutput(logits, cdf)
