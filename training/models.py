"""A trained network loaded for export or evaluation, with what its checkpoint says about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.tables import CalibrationTables, build_calibration_tables
from training.networks import build_network


class ExportError(Exception):
    """The model is unusable for export or evaluation (checker failure, parity above tolerance, bad
    checkpoint)."""


def untrained_model(network: str, num_classes: int = 19, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(network, num_classes).eval()


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for export or evaluation, with what its checkpoint says about it."""

    model: nn.Module
    network: str
    trained: bool
    config: dict[str, Any] = field(default_factory=dict)
    tables: CalibrationTables | None = None  # from the checkpoint's GMM state, when it has one
    metrics: dict[str, Any] = field(default_factory=dict)
    iteration: int | None = None
    eval_scale: float | None = None  # the training loop evaluates on images resized by this factor


def load_model(checkpoint: str | Path, network: str | None = None, teacher: bool = False) -> LoadedModel:
    """A training checkpoint (a dict with "model" and, from the training loop, "network"/"config", GMM
    states and metrics) or a plain state-dict file (then `network` names the architecture). `teacher`
    takes the EMA teacher's weights of a self-training checkpoint instead of the student's."""
    from calibration.bundle import MANIFEST_FILE, sniff_model_file

    path = Path(checkpoint)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        raise ExportError(
            f"{path}: expected a torch checkpoint file, got a bundle directory (pass it as --bundle)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a checkpoint file, got no such file")
    if sniff_model_file(path) == "an ONNX model":
        # torch.load's answer would be a paragraph about pickles and weights_only.
        raise ExportError(
            f"{path}: expected a torch checkpoint, got an ONNX model (pass its bundle directory as --bundle)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: expected a torch checkpoint, got an unreadable file ({first})") from exc
    if not isinstance(state, dict):
        raise ExportError(
            f"{path}: expected a dict (a checkpoint or a state dict), got {type(state).__name__}"
        )
    if "format" in state and "model" in state:
        return _from_training_checkpoint(path, network, teacher)
    if network is None:
        raise ExportError(f"{path}: a plain state dict does not name its network: expected --network NAME")
    model = build_network(network)
    _load_state(model, state, path)
    return LoadedModel(model.eval(), network, trained=True)


def _load_state(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(
            f"{path}: expected weights matching the network, got: {str(exc).splitlines()[0]}"
        ) from exc


def _from_training_checkpoint(path: Path, network: str | None, teacher: bool) -> LoadedModel:
    from training.checkpoint import calibration_gmms, load_checkpoint
    from training.config import to_dict

    ckpt = load_checkpoint(path)
    name = network or ckpt.config.model.network
    model = build_network(name, ckpt.config.model.num_classes)
    weights = ckpt.model
    if teacher:
        if ckpt.teacher is None:
            raise ExportError(f"{path}: teacher: expected EMA teacher weights in the checkpoint, got none")
        weights = ckpt.teacher
    _load_state(model, weights, path)
    tables = None
    if ckpt.gmm_source is not None and int(ckpt.gmm_source.updates.sum()) > 0:
        tables = build_calibration_tables(*calibration_gmms(ckpt))
    return LoadedModel(
        model.eval(),
        name,
        trained=True,
        config=to_dict(ckpt.config),
        tables=tables,
        metrics=dict(ckpt.metrics),
        iteration=ckpt.iteration,
        eval_scale=float(ckpt.config.data.eval_scale),
    )
