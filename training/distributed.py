"""Data-parallel helpers: the device a process trains on, the process group from torchrun's environment,
all-reduce / all-gather helpers that are identities on one process, DistributedDataParallel wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DevicePlan:
    """Where one process trains: the torch device, the process-group backend and DDP's device_ids."""

    device: str  # "cpu" or "cuda:<local rank>"
    backend: str  # "gloo" on CPU, "nccl" on GPU
    device_ids: list[int] | None  # [local rank] on GPU; None on CPU (DDP raises if given there)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def choose_device(
    requested: str, cuda_available: bool, local_rank: int = 0, cuda_count: int = 1
) -> DevicePlan:
    """The plan for `--device auto|cpu|cuda` (a pure function: the caller asks torch what is available).
    auto takes CUDA when there is one; each process of a node takes the GPU of its local rank."""
    if requested not in DEVICES:
        raise ValueError(f"--device: expected one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cuda" and not cuda_available:
        raise ValueError(
            "--device cuda: expected a CUDA device, got none (torch.cuda.is_available() is False)"
        )
    if requested == "cpu" or not cuda_available:
        return DevicePlan("cpu", "gloo", None)
    if not 0 <= local_rank < cuda_count:
        raise ValueError(f"LOCAL_RANK: expected a rank below the {cuda_count} CUDA devices, got {local_rank}")
    return DevicePlan(f"cuda:{local_rank}", "nccl", [local_rank])


def device_plan(requested: str = "auto") -> DevicePlan:
    """choose_device for this process: torchrun's LOCAL_RANK and what torch sees."""
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    available = torch.cuda.is_available()
    return choose_device(requested, available, local, torch.cuda.device_count() if available else 0)


def init_from_env(plan: DevicePlan | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) with the plan's
    backend (gloo on CPU, nccl on GPU). One process without those variables."""
    plan = plan or DevicePlan("cpu", "gloo", None)
    if plan.cuda:
        torch.cuda.set_device(torch.device(plan.device))  # before nccl, so it binds this process's GPU
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        dist.init_process_group(backend=plan.backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a new tensor; identity on one process)."""
    if not _active():
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all processes along dim 0, in rank order."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj: object) -> object:
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap_ddp(model: nn.Module, info: DistInfo, device_ids: list[int] | None = None) -> nn.Module:
    """DDP around a model already on its device; device_ids from the DevicePlan (None on CPU, where DDP
    refuses them, even on a machine that has a GPU the run does not use)."""
    if not info.enabled:
        return model
    # The CDF head takes no part in the loss when λ = 0 (and in the mixed-image loss ever), so some
    # parameters get no gradient in a backward pass.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
