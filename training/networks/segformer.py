"""A compact SegFormer-style network (Xie et al. 2021): a hierarchical Mix Transformer encoder
(overlapping patch embeddings, efficient self-attention with spatial reduction, Mix-FFN) and an
all-MLP decoder that fuses the four stages at 1/4 of the input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.networks.common import SegHeads, SegOutput


@dataclass(frozen=True)
class MitConfig:
    dims: tuple[int, ...] = (32, 64, 128, 160)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    heads: tuple[int, ...] = (1, 2, 4, 5)
    reductions: tuple[int, ...] = (8, 4, 2, 1)  # spatial reduction of keys/values per stage
    mlp_ratio: int = 4
    decoder: int = 128


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with a kernel larger than its stride, so neighbouring patches overlap."""

    def __init__(self, cin: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Cin, H, W) -> (N, D, H/s, W/s)
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map reduced by `reduction`."""

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduce: nn.Module = nn.Identity()
        self.reduce_norm: nn.Module = nn.Identity()
        if reduction > 1:
            self.reduce = nn.Conv2d(dim, dim, reduction, reduction)
            self.reduce_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D, H, W)
        n, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, D)
        kv_in = self.reduce_norm(self.reduce(x).flatten(2).transpose(1, 2))  # (N, hw, D)
        q = self.q(tokens).reshape(n, -1, self.heads, d // self.heads).transpose(1, 2)  # (N, h, HW, d)
        kv = self.kv(kv_in).reshape(n, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (N, h, hw, d)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (N, h, HW, hw)
        out = (attn @ v).transpose(1, 2).reshape(n, -1, d)  # (N, HW, D)
        return self.proj(out).transpose(1, 2).reshape(n, d, h, w)


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (positional information without embeddings) -> GELU -> linear."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D, H, W)
        return self.fc2(F.gelu(self.dw(self.fc1(x))))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (N, D, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = ChannelNorm(dim)
        self.attn = EfficientAttention(dim, heads, reduction)
        self.norm2 = ChannelNorm(dim)
        self.ffn = MixFFN(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D, H, W)
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class MixTransformer(nn.Module):
    """Four stages at 1/4, 1/8, 1/16, 1/32 of the input."""

    def __init__(self, cfg: MitConfig) -> None:
        super().__init__()
        if not len(cfg.dims) == len(cfg.depths) == len(cfg.heads) == len(cfg.reductions):
            raise ValueError("MitConfig: expected dims, depths, heads and reductions of equal length")
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        cin = 3
        for i, dim in enumerate(cfg.dims):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            self.embeds.append(OverlapPatchEmbed(cin, dim, kernel, stride))
            blocks = [
                TransformerBlock(dim, cfg.heads[i], cfg.reductions[i], cfg.mlp_ratio)
                for _ in range(cfg.depths[i])
            ]
            self.stages.append(nn.Sequential(*blocks))
            self.norms.append(ChannelNorm(dim))
            cin = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (N, 3, H, W)
        features = []
        for embed, stage, norm in zip(self.embeds, self.stages, self.norms, strict=True):
            x = norm(stage(embed(x)))
            features.append(x)  # (N, D_i, H/2^(i+2), W/2^(i+2))
        return features


class MLPDecoder(nn.Module):
    """Project every stage to one width, upsample to 1/4, concatenate, fuse with a 1x1 conv."""

    def __init__(self, dims: tuple[int, ...], decoder: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Conv2d(d, decoder, 1) for d in dims])
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder * len(dims), decoder, 1, bias=False), nn.BatchNorm2d(decoder), nn.ReLU()
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        ups = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) if i else p(f)
            for i, (p, f) in enumerate(zip(self.proj, features, strict=True))
        ]  # each (N, E, H/4, W/4)
        return self.fuse(torch.cat(ups, dim=1))  # (N, E, H/4, W/4)


class SegFormer(nn.Module):
    def __init__(self, num_classes: int = 19, cfg: MitConfig = MitConfig()) -> None:
        super().__init__()
        self.encoder = MixTransformer(cfg)
        self.decoder = MLPDecoder(cfg.dims, cfg.decoder)
        self.heads = SegHeads(cfg.decoder, num_classes)
        self.num_classes = num_classes
        self.apply(_init_weights)

    def forward(self, image: torch.Tensor) -> SegOutput:  # (N, 3, H, W) normalised
        return self.heads(self.decoder(self.encoder(image)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def segformer_mini(num_classes: int = 19) -> SegFormer:
    return SegFormer(num_classes, MitConfig())


TINY_CONFIG = MitConfig(
    dims=(8, 16, 16, 32),
    depths=(1, 1, 1, 1),
    heads=(1, 1, 2, 2),
    reductions=(4, 2, 1, 1),
    mlp_ratio=2,
    decoder=16,
)


def segformer_tiny(num_classes: int = 19) -> SegFormer:
    return SegFormer(num_classes, TINY_CONFIG)
