"""The training loop: every arm runs; exact resume; determinism; checkpoint format; the CLI's errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from training.checkpoint import calibration_gmms, load_checkpoint
from training.config import TrainConfig, load_config
from training.data.datasets import Sample
from training.uda.loop import Domains, run_training


class FakeDomain:
    """Blocky scenes: each block's class decides its colour; the target domain shifts the colours."""

    def __init__(self, n: int, seed: int, shift: int) -> None:
        rng = np.random.default_rng(seed)
        self.samples = []
        for i in range(n):
            blocks = rng.integers(0, 6, size=(4, 8))
            label = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)  # (64, 128)
            colours = (np.arange(6)[:, None] * np.array([40, 25, 10]) + shift) % 256
            image = colours[label].astype(np.uint8) + rng.integers(0, 20, (64, 128, 3)).astype(np.uint8)
            label[:2] = 255
            self.samples.append(Sample(image, label, f"{i:03d}"))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two cores shared by several processes: more threads only add contention for these tiny models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _domains() -> Domains:
    return Domains(FakeDomain(8, 0, 0), FakeDomain(8, 1, 60), FakeDomain(3, 2, 60))


def _cfg(arm: str, iterations: int = 6) -> TrainConfig:
    return load_config(
        arm,
        overrides=[
            "model.network=mobilenet_lraspp_tiny",
            "model.num_classes=6",
            "data.crop_height=32",
            "data.crop_width=64",
            "data.rcs_min_pixels=10",
            f"optim.iterations={iterations}",
            "optim.warmup_iters=2",
            "self_training.start_iter=1",
            "self_training.ramp_iters=2",
            "self_training.pseudo_threshold=0.1",
            "blda.start_iter=2",
            "blda.table_every=2",
            "blda.momentum_ramp_iters=3",
            "blda.cdf_weight=0.2",
            "log.progress=false",
            "log.log_every=1",
            "log.checkpoint_every=2",
        ],
    )


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arm", ["source-only", "self-training", "blda"])
def test_arm_trains_logs_and_evaluates(arm: str, tmp_path: Path) -> None:
    result = run_training(_cfg(arm, 4), _domains(), tmp_path)
    assert result["iteration"] == 4 and 0 <= result["miou"] <= 1
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss_source"]) for r in lines)
    if arm != "source-only":
        assert "loss_mix" in lines[-1]
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["arm"] == arm and len(ev["iou"]) == 6
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt.iteration == 4 and ckpt.config.arm == arm
    assert (ckpt.teacher is None) == (arm == "source-only")
    assert (ckpt.gmm_source is None) == (arm != "blda")


def test_resume_continues_exactly(tmp_path: Path) -> None:
    cfg = _cfg("blda", 6)
    straight = run_training(cfg, _domains(), tmp_path / "a")
    run_training(cfg, _domains(), tmp_path / "b", stop_at=3)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt").iteration == 3
    resumed = run_training(cfg, _domains(), tmp_path / "b", resume=True)
    assert resumed["iteration"] == 6
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    _assert_same_state(a.model, b.model)
    assert a.teacher is not None and b.teacher is not None
    _assert_same_state(a.teacher, b.teacher)
    assert a.gmm_source is not None and b.gmm_source is not None
    assert a.gmm_target is not None and b.gmm_target is not None
    _assert_same_state(a.gmm_source.state_dict(), b.gmm_source.state_dict())
    _assert_same_state(a.gmm_target.state_dict(), b.gmm_target.state_dict())
    assert straight["miou"] == resumed["miou"]
    # The optimiser and scheduler were restored too: the learning rates logged agree.
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(s).items() if k != "step_seconds"} for s in la]
    assert strip == [{k: v for k, v in json.loads(s).items() if k != "step_seconds"} for s in lb]


def test_runs_are_deterministic_and_seeds_differ(tmp_path: Path) -> None:
    cfg = _cfg("self-training", 3)
    run_training(cfg, _domains(), tmp_path / "a", evaluate_at_end=False)
    run_training(cfg, _domains(), tmp_path / "b", evaluate_at_end=False)
    other = load_config("self-training", overrides=[], seed=1)
    run_training(
        TrainConfig(**{**cfg.__dict__, "seed": other.seed}), _domains(), tmp_path / "c", evaluate_at_end=False
    )
    a, b, c = (load_checkpoint(tmp_path / n / "checkpoint.pt").model for n in "abc")
    _assert_same_state(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_exports_numpy_gmms(tmp_path: Path) -> None:
    run_training(_cfg("blda", 3), _domains(), tmp_path, evaluate_at_end=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    source, source_counts, target, target_counts = calibration_gmms(ckpt)
    assert source.weights.shape == (6, 6, 5) and target.means.shape == (6, 6, 5)
    assert source_counts.shape == target_counts.shape == (6, 6) and source_counts.dtype == np.int64
    np.testing.assert_allclose(source.weights.sum(-1), 1.0)
    assert int(source_counts.sum()) > 0
    assert ckpt.gmm_source is not None
    np.testing.assert_array_equal(source.means, ckpt.gmm_source.means.numpy())


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format": 99}, bad)
    with pytest.raises(ValueError, match=r"bad\.pt: format: expected 1, got 99"):
        load_checkpoint(bad)


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    from blda.cli import app

    runner = CliRunner()
    for args, needle in [
        (["--arm", "dacs"], "arm: expected one of"),
        (["--arm", "blda", "--set", "optim.lr=x"], "optim.lr: expected a number"),
        (["--arm", "blda"], "expected a data folder"),
    ]:
        res = runner.invoke(app, ["train", *args, "--data", str(tmp_path / "nodata"), "--out", str(tmp_path)])
        assert res.exit_code == 2, res.output
        assert needle in res.output and "Traceback" not in res.output


def test_train_refuses_a_non_empty_out_unless_resuming(tmp_path: Path) -> None:
    from blda.cli import app

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    args = ["train", "--arm", "source-only", "--data", str(tmp_path / "nodata"), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--out: expected a new or empty run folder" in res.output, res.output
    assert "metrics.jsonl" in res.output and "--resume" in res.output and "Traceback" not in res.output
    # With --resume the folder is accepted (here the missing data is the next error).
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "expected a data folder" in res.output, res.output
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_mixed_precision_trains_on_cpu(tmp_path: Path) -> None:
    """optim.amp: bfloat16 autocast around the forward passes (a real CPU run, not a faked GPU one); the
    GMMs and tables stay float64, the losses finite, the checkpoint loads."""
    cfg = replace(_cfg("blda", 3), optim=replace(_cfg("blda", 3).optim, amp=True))
    result = run_training(cfg, _domains(), tmp_path, evaluate_at_end=False, device="cpu")
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(np.isfinite(r["loss_source"]) for r in lines)
    assert all(np.isfinite(r["loss_mix"]) for r in lines[1:])  # self-training starts at iteration 1
    state = result["state"]
    assert state.gmm_source.means.dtype == torch.float64 and bool(state.gmm_source.initialized.any())
    assert load_checkpoint(tmp_path / "checkpoint.pt").config.optim.amp is True


def test_forward_runs_under_autocast_only_with_amp() -> None:
    from training.networks import build_network
    from training.uda.loop import StepContext, _forward, amp_dtype

    net = build_network("mobilenet_lraspp_tiny", 6).eval()
    inner: list[torch.dtype] = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: inner.append(out.dtype))
    x = torch.randn(1, 3, 32, 64)
    for amp, expected in ((False, torch.float32), (True, torch.bfloat16)):
        cfg = _cfg("blda")
        cfg = replace(cfg, optim=replace(cfg.optim, amp=amp))
        ctx = StepContext(cfg=cfg, domains=_domains(), amp_dtype=amp_dtype(cfg, torch.device("cpu")))
        out = _forward(net, x, ctx)
        assert inner[-1] == expected and out.logits.dtype == torch.float32
