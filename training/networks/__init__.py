"""Segmentation networks written in the project (no downloads): a dict from name to constructor.

Every network maps a normalised image (N, 3, H, W) to SegOutput(logits (N, C, ceil(H/4), ceil(W/4)),
cdf (N, 1, ceil(H/4), ceil(W/4))).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from training.networks.common import (
    IMAGE_MEAN,
    IMAGE_STD,
    OUTPUT_STRIDE,
    SegOutput,
    images_to_tensor,
    normalise_images,
    output_size,
)
from training.networks.mobilenet import mobilenet_lraspp, mobilenet_lraspp_tiny
from training.networks.segformer import segformer_mini, segformer_tiny

NETWORKS: dict[str, Callable[[int], nn.Module]] = {
    "mobilenet_lraspp": mobilenet_lraspp,
    "segformer_mini": segformer_mini,
    # Narrow versions for tests and smoke runs.
    "mobilenet_lraspp_tiny": mobilenet_lraspp_tiny,
    "segformer_tiny": segformer_tiny,
}


def build_network(name: str, num_classes: int = 19, weights: str | Path | None = None) -> nn.Module:
    """Construct a network by name; `weights` is an optional local state-dict file (or a dict holding one
    under "model")."""
    if name not in NETWORKS:
        raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {name!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
    model = NETWORKS[name](num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a weights file, got no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: expected weights matching the network, got: {err}") from err


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "NETWORKS",
    "OUTPUT_STRIDE",
    "SegOutput",
    "build_network",
    "count_parameters",
    "images_to_tensor",
    "load_weights",
    "normalise_images",
    "output_size",
]
