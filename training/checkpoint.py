"""Checkpoint format of `blda train` (read by export): one torch file per checkpoint.

`torch.load(path, weights_only=True)` gives a dict:
- "format": FORMAT_VERSION; "iteration": iterations completed; "config": TrainConfig as a plain dict;
- "model", "teacher": state dicts (teacher None for source-only); "optimizer", "scheduler": state dicts;
- "gmm": {"source": GmmState dict, "target": GmmState dict} or None (fields weights/means/stds (C, C, K)
  float64, counts (C, C) float64, updates, last_seen (C, C) int64);
- "rng": {"python": tuple as list, "numpy": dict, "torch": uint8 tensor} states when saved;
- "tables": BLDA's anchor and shift tables in use (tensors), or None;
- "metrics": last evaluation metrics (dict of floats / lists), possibly empty.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig, from_dict, to_dict
from training.uda.gmm import GmmState, to_numpy_gmm

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: TrainConfig
    iteration: int
    model: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    gmm_source: GmmState | None = None
    gmm_target: GmmState | None = None
    rng: dict[str, Any] | None = None
    tables: dict[str, torch.Tensor] | None = None  # BLDA's current anchor/shift tables (exact resume)
    metrics: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    # The legacy global numpy RNG is what third-party code draws from, so it is the state to keep.
    np_state: Any = np.random.get_state()  # noqa: NPY002
    return {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].copy()),
            "rest": list(np_state[2:]),
        },
        "torch": torch.get_rng_state(),
    }


def _to_lists(obj: Any) -> Any:
    return [_to_lists(o) for o in obj] if isinstance(obj, tuple | list) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy(), *np_state["rest"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically (temporary file + rename), so an interrupted save leaves the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gmm = None
    if ckpt.gmm_source is not None and ckpt.gmm_target is not None:
        gmm = {"source": ckpt.gmm_source.state_dict(), "target": ckpt.gmm_target.state_dict()}
    payload = {
        "format": FORMAT_VERSION,
        "iteration": ckpt.iteration,
        "config": to_dict(ckpt.config),
        "model": ckpt.model,
        "teacher": ckpt.teacher,
        "optimizer": ckpt.optimizer,
        "scheduler": ckpt.scheduler,
        "gmm": gmm,
        "rng": ckpt.rng,
        "tables": ckpt.tables,
        "metrics": ckpt.metrics,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a checkpoint file, got no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: expected a torch checkpoint, got an unreadable file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format: expected {FORMAT_VERSION}, got {got!r}")
    for key in ("iteration", "config", "model"):
        if key not in data:
            raise ValueError(f"{path}: {key}: expected a value, got none")
    gmm = data.get("gmm")
    return Checkpoint(
        config=from_dict(data["config"]),
        iteration=int(data["iteration"]),
        model=data["model"],
        teacher=data.get("teacher"),
        optimizer=data.get("optimizer"),
        scheduler=data.get("scheduler"),
        gmm_source=GmmState.from_state_dict(gmm["source"]) if gmm else None,
        gmm_target=GmmState.from_state_dict(gmm["target"]) if gmm else None,
        rng=data.get("rng"),
        tables=data.get("tables"),
        metrics=data.get("metrics") or {},
    )


def load_init_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The student weights of a training checkpoint, to start another run from (model.init_checkpoint).
    Only the weights are read, so a checkpoint written under another configuration schema still serves."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_checkpoint: expected a checkpoint file, got no such file {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: expected a torch checkpoint, got an unreadable file ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: model: expected a training checkpoint with model weights, got none")
    return data["model"]


def calibration_gmms(ckpt: Checkpoint) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """GMM state -> (source Gmm (C, C, K), source counts (C, C) int64, target Gmm, target counts) as
    numpy `calibration.distributions.Gmm`, for calibration.tables.build_calibration_tables. A checkpoint
    without target estimates returns the source ones for the target (the core's convention)."""
    from calibration.distributions import Gmm

    if ckpt.gmm_source is None:
        raise ValueError("checkpoint: gmm: expected GMM state (a BLDA run or GMM tracking), got none")
    sw, sm, ss, sc = to_numpy_gmm(ckpt.gmm_source)
    source = Gmm(weights=sw, means=sm, stds=ss)
    if ckpt.gmm_target is None or int(ckpt.gmm_target.updates.sum()) == 0:
        return source, sc, source, sc
    tw, tm, ts, tc = to_numpy_gmm(ckpt.gmm_target)
    return source, sc, Gmm(weights=tw, means=tm, stds=ts), tc
