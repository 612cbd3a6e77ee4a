"""Two CPU processes (gloo on 127.0.0.1): the all-reduced GMM estimate equals one process on the union of
the batches, pseudo-label statistics agree, and DDP training keeps both replicas identical."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.distributed import all_gather_cat, all_reduce_sum
from training.uda.gmm import GmmState, OnlineGmmConfig, update_gmm
from training.uda.pseudo_labels import pseudo_labels_from_probs

CFG = OnlineGmmConfig(components=3, em_steps=3, samples_per_class=4096, momentum_ramp_iters=2)
C = 4


def _batches(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + iteration)
    y = torch.randint(0, C, (600,), generator=g)
    z = torch.randn(600, C, generator=g) * 2 - 1
    z[torch.arange(600), y] += 5 + 2 * y.float()
    if iteration == 1:
        y[y == 3] = 255  # class 3 missing for one iteration on every process
    return z, y


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(60))
    try:
        state = GmmState.empty(C, CFG.components)
        for it in range(3):
            z, y = _batches(it)
            half = slice(rank * 300, (rank + 1) * 300)
            state = update_gmm(
                state,
                z[half],
                y[half],
                it,
                CFG,
                torch.Generator().manual_seed(rank),
                all_reduce_sum,
                all_gather_cat,
            )
        probs = torch.softmax(_batches(0)[0][rank * 300 : (rank + 1) * 300].t().reshape(1, C, 300, 1), 1)
        pl = pseudo_labels_from_probs(probs, 0.9, all_reduce_sum)
        torch.save(
            {"gmm": state.state_dict(), "weight": pl.weight, "counts": pl.class_counts}, f"{out}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_estimate_what_one_process_does_on_the_union(tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    single = GmmState.empty(C, CFG.components)
    for it in range(3):
        z, y = _batches(it)
        single = update_gmm(single, z, y, it, CFG, torch.Generator())
    probs = torch.softmax(_batches(0)[0].t().reshape(1, C, 600, 1), 1)
    pl = pseudo_labels_from_probs(probs, 0.9)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            np.testing.assert_allclose(
                got["gmm"][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name
            )
        assert got["weight"] == pytest.approx(pl.weight)
        np.testing.assert_array_equal(got["counts"].numpy(), pl.class_counts.numpy())


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    from test_loop import _cfg, _domains

    from training.distributed import shutdown
    from training.uda.loop import run_training

    try:
        cfg = replace(_cfg("blda", 3), log=replace(_cfg("blda", 3).log, checkpoint_every=100))
        result = run_training(cfg, _domains(), Path(out) / "run", evaluate_at_end=False)
        state = result["state"]
        from training.distributed import unwrap

        torch.save(
            {"model": unwrap(state.model).state_dict(), "gmm": state.gmm_source.state_dict()},
            f"{out}/{rank}.pt",
        )
    finally:
        shutdown()


def test_two_process_training_keeps_replicas_identical(tmp_path: Path) -> None:
    mp.start_processes(
        _train_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    # Parameters are identical; BatchNorm running statistics are per replica between DDP's buffer
    # broadcasts (rank 0's are the ones checkpointed).
    params = [k for k in a["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 10
    for k in params:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)
    for k, v in a["gmm"].items():
        torch.testing.assert_close(v, b["gmm"][k], msg=k)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_device_placement_plan() -> None:
    """--device auto|cpu|cuda as a pure function of what torch reports: nccl with the local rank's GPU as
    DDP's device_ids on GPU, gloo and no device_ids on CPU (DDP raises on device_ids for a CPU module)."""
    from training.distributed import DevicePlan, choose_device

    assert choose_device("auto", cuda_available=False) == DevicePlan("cpu", "gloo", None)
    assert choose_device("cpu", cuda_available=True, local_rank=1, cuda_count=2) == DevicePlan(
        "cpu", "gloo", None
    )
    assert choose_device("auto", True, local_rank=1, cuda_count=2) == DevicePlan("cuda:1", "nccl", [1])
    assert choose_device("cuda", True, local_rank=0, cuda_count=1) == DevicePlan("cuda:0", "nccl", [0])
    with pytest.raises(ValueError, match="--device cuda: expected a CUDA device, got none"):
        choose_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="LOCAL_RANK: expected a rank below the 2 CUDA devices, got 2"):
        choose_device("auto", True, local_rank=2, cuda_count=2)
    with pytest.raises(ValueError, match="--device: expected one of auto, cpu, cuda, got 'gpu'"):
        choose_device("gpu", True)


def test_the_cpu_plan_builds_a_cpu_state_and_ddp_gets_no_device_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import distributed
    from training.config import load_config
    from training.uda import loop

    seen: dict[str, object] = {}

    def fake_ddp(
        model: torch.nn.Module, device_ids: list[int] | None, find_unused_parameters: bool
    ) -> object:
        seen["device_ids"] = device_ids
        return model

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    cfg = load_config("blda", overrides=["model.network=mobilenet_lraspp_tiny", "model.num_classes=4"])
    state = loop.build_state(cfg, world_size=2, rank=1, plan=distributed.choose_device("auto", False))
    assert seen == {"device_ids": None}
    assert next(state.model.parameters()).device.type == "cpu"
    assert state.gmm_source is not None and state.gmm_source.means.device.type == "cpu"
    assert not state.scaler.is_enabled()
    # The plan's device_ids reach DDP unchanged (a GPU plan's [local rank]; the module stays on the CPU
    # here: this checks the plumbing, it is not a GPU run).
    loop.build_state(cfg, world_size=2, rank=1, plan=distributed.DevicePlan("cpu", "nccl", [3]), local_rank=3)
    assert seen == {"device_ids": [3]}
