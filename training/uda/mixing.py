"""ClassMix of source into target with an explicit domain mask (never inferred from weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration.labels import IGNORE_INDEX


@dataclass(frozen=True)
class Mixed:
    images: torch.Tensor  # (N, 3, H, W)
    labels: torch.Tensor  # (N, H, W) int64
    weights: torch.Tensor  # (N, H, W) per-pixel loss weight: 1 on source pixels, pseudo weight on target
    source_mask: torch.Tensor  # (N, H, W) bool: True where the pixel comes from the source image


def class_masks(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, H, W) source labels -> (N, H, W) bool: pixels of a random half of each image's classes."""
    masks = []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != IGNORE_INDEX]
        if classes.numel() == 0:
            masks.append(torch.zeros_like(lab, dtype=torch.bool))
            continue
        # Random draws come from the (CPU) generator and move to the data's device.
        order = torch.randperm(classes.numel(), generator=generator).to(classes.device)
        chosen = classes[order[: (classes.numel() + 1) // 2]]
        masks.append(torch.isin(lab, chosen))
    return torch.stack(masks)


def classmix(
    source_images: torch.Tensor,  # (N, 3, H, W)
    source_labels: torch.Tensor,  # (N, H, W)
    target_images: torch.Tensor,  # (N, 3, H, W)
    target_labels: torch.Tensor,  # (N, H, W) pseudo-labels
    target_weight: torch.Tensor | float,  # scalar or (N, H, W)
    mask: torch.Tensor,  # (N, H, W) bool: source pixels
) -> Mixed:
    m3 = mask[:, None]
    images = torch.where(m3, source_images, target_images)
    labels = torch.where(mask, source_labels.long(), target_labels.long())
    tw = torch.as_tensor(target_weight, dtype=images.dtype).expand(mask.shape)
    weights = torch.where(mask, torch.ones_like(tw), tw)
    return Mixed(images=images, labels=labels, weights=weights, source_mask=mask)


def strong_augment(
    images: torch.Tensor,  # (N, 3, H, W) normalised images
    mean: torch.Tensor,  # (3,) normalisation mean
    std: torch.Tensor,  # (3,)
    jitter: float,
    blur: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DACS' strong augmentation of the mixed image: colour jitter (brightness, contrast, saturation) and a
    random Gaussian blur, on [0, 1] pixels, per image."""
    n = images.shape[0]
    x = images * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)  # (N, 3, H, W) in [0, 1]
    if jitter > 0:
        u = ((torch.rand((n, 3), generator=generator) * 2 - 1) * jitter + 1).to(x.device)  # (N, 3) factors
        x = x * u[:, 0].view(n, 1, 1, 1)
        grey = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - grey) * u[:, 1].view(n, 1, 1, 1) + grey
        lum = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = (x - lum) * u[:, 2].view(n, 1, 1, 1) + lum
        x = x.clamp(0, 1)
    if blur:
        sigmas = 0.15 + torch.rand(n, generator=generator) * 1.0  # (N,) on the CPU
        apply = torch.rand(n, generator=generator) < 0.5
        radius = 2
        offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
        out = []
        for i in range(n):
            if not bool(apply[i]):
                out.append(x[i])
                continue
            k = torch.exp(-0.5 * (offsets / sigmas[i]) ** 2)
            k = (k / k.sum()).to(x.device)  # the kernel is built on the CPU
            xi = x[i : i + 1]
            xi = torch.nn.functional.conv2d(
                torch.nn.functional.pad(xi, (radius, radius, 0, 0), mode="replicate"),
                k.view(1, 1, 1, -1).expand(3, 1, 1, -1),
                groups=3,
            )
            xi = torch.nn.functional.conv2d(
                torch.nn.functional.pad(xi, (0, 0, radius, radius), mode="replicate"),
                k.view(1, 1, -1, 1).expand(3, 1, -1, 1),
                groups=3,
            )
            out.append(xi[0])
        x = torch.stack(out)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
