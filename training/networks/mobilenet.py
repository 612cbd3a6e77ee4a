"""A compact MobileNetV2/V3-style encoder (inverted residuals, squeeze-excitation) with a LR-ASPP head.

Deviation from LR-ASPP (Howard et al. 2019): instead of summing two class predictions, the gated
high-level features are upsampled to 1/4 and fused with projected 1/4 features by one depthwise
separable conv, so both the classifier and the CDF head read one shared decoder feature map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.networks.common import ConvBNAct, SegHeads, SegOutput


@dataclass(frozen=True)
class Block:
    expand: int  # expansion ratio of the inverted residual
    out: int  # output channels
    stride: int
    se: bool  # squeeze-excitation


# Stride of each stage relative to the input: stem /2, then /2 (skip at 1/4), /2, /2 -> 1/16.
SMALL_BLOCKS: tuple[Block, ...] = (
    Block(1, 16, 1, False),
    Block(4, 24, 2, False),  # 1/4
    Block(3, 24, 1, False),
    Block(3, 40, 2, True),  # 1/8
    Block(3, 40, 1, True),
    Block(4, 64, 2, True),  # 1/16
    Block(4, 64, 1, True),
    Block(4, 96, 1, True),
)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(8, channels // 4)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D, H, W)
        # A mean rather than adaptive pooling: it exports to ONNX with dynamic H, W.
        s = x.mean((2, 3), keepdim=True)  # (N, D, 1, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, block: Block) -> None:
        super().__init__()
        hidden = cin * block.expand
        layers: list[nn.Module] = []
        if block.expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers.append(ConvBNAct(hidden, hidden, 3, block.stride, groups=hidden))
        if block.se:
            layers.append(SqueezeExcite(hidden))
        layers.append(ConvBNAct(hidden, block.out, 1, act=False))
        self.body = nn.Sequential(*layers)
        self.residual = block.stride == 1 and cin == block.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetEncoder(nn.Module):
    """Returns features at 1/4 (skip) and 1/16 (high level)."""

    def __init__(self, blocks: tuple[Block, ...] = SMALL_BLOCKS, stem: int = 16) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, stem, 3, 2)
        layers = []
        cin = stem
        stride = 2
        self.skip_index = -1
        for i, block in enumerate(blocks):
            layers.append(InvertedResidual(cin, block))
            cin = block.out
            stride *= block.stride
            if stride == 4:
                self.skip_index = i
        if self.skip_index < 0:
            raise ValueError("blocks: expected a stage at stride 4 for the skip connection")
        self.blocks = nn.ModuleList(layers)
        self.skip_channels = blocks[self.skip_index].out
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 3, H, W)
        x = self.stem(x)
        skip = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.skip_index:
                skip = x  # (N, S, H/4, W/4)
        return skip, x  # (N, S, H/4, W/4), (N, D, H/16, W/16)


class LRASPPHead(nn.Module):
    def __init__(self, skip_channels: int, high_channels: int, decoder: int) -> None:
        super().__init__()
        self.high = nn.Sequential(
            nn.Conv2d(high_channels, decoder, 1, bias=False), nn.BatchNorm2d(decoder), nn.ReLU()
        )
        self.gate = nn.Conv2d(high_channels, decoder, 1)
        self.skip = ConvBNAct(skip_channels, decoder // 2, 1)
        self.fuse = nn.Sequential(
            ConvBNAct(decoder + decoder // 2, decoder + decoder // 2, 3, groups=decoder + decoder // 2),
            ConvBNAct(decoder + decoder // 2, decoder, 1),
        )

    def forward(self, skip: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(high.mean((2, 3), keepdim=True)))  # (N, D, 1, 1)
        x = self.high(high) * gate  # (N, D, H/16, W/16)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (N, D, H/4, W/4)
        return self.fuse(torch.cat([x, self.skip(skip)], dim=1))  # (N, D, H/4, W/4)


class MobileNetLRASPP(nn.Module):
    def __init__(
        self,
        num_classes: int = 19,
        blocks: tuple[Block, ...] = SMALL_BLOCKS,
        stem: int = 16,
        decoder: int = 64,
    ) -> None:
        super().__init__()
        self.encoder = MobileNetEncoder(blocks, stem)
        self.decoder = LRASPPHead(self.encoder.skip_channels, self.encoder.out_channels, decoder)
        self.heads = SegHeads(decoder, num_classes)
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor) -> SegOutput:  # (N, 3, H, W) normalised
        skip, high = self.encoder(image)
        return self.heads(self.decoder(skip, high))


def mobilenet_lraspp(num_classes: int = 19) -> MobileNetLRASPP:
    return MobileNetLRASPP(num_classes)


# Narrow stages for unit tests and smoke runs.
TINY_BLOCKS: tuple[Block, ...] = (
    Block(1, 8, 1, False),
    Block(2, 16, 2, False),
    Block(2, 24, 2, True),
    Block(2, 32, 2, True),
)


def mobilenet_lraspp_tiny(num_classes: int = 19) -> MobileNetLRASPP:
    return MobileNetLRASPP(num_classes, TINY_BLOCKS, stem=8, decoder=16)
