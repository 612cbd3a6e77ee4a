"""Tests that pin the method: each breaks when its detail breaks (the sign and presence of the training
correction, which domain's tables a mixed pixel uses, anchors from the source only, Δ at label resolution,
the GMM row minimum, the warm start, the t ramp, the ignored bottom rows)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from training.config import TrainConfig, load_config
from training.datasets import Batch
from training.uda import loop
from training.uda.gmm import (
    GmmState,
    OnlineGmmConfig,
    ShiftTable,
    build_anchors,
    pooled_anchors,
    shift_for_labels,
    stack_tables,
    update_gmm,
)
from training.uda.teacher import EmaTeacher

C = 3  # classes of the toy problems


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class _Out:
    logits: torch.Tensor
    cdf: torch.Tensor


class BiasNet(nn.Module):
    """logits = planted per-pixel logits (channel 0..C-1 of the "image") + a learnable per-class bias: a
    network whose only freedom is the class prior, so a step's effect on the bias is the loss's pull on each
    class's logits. Output at the input resolution, or at half of it (`stride=2`, averaged as a stand-in for
    a strided decoder)."""

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(C))
        self.stride = stride
        self.num_classes = C

    def forward(self, images: torch.Tensor) -> _Out:  # (N, 3, H, W) -> (N, C, h, w)
        z = images[:, :C]
        if self.stride > 1:
            z = nn.functional.avg_pool2d(z, self.stride)
        logits = z + self.bias.view(1, C, 1, 1)
        return _Out(logits, torch.zeros_like(logits[:, :1]))


def _planted(seed: int, n: int = 2, h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 fills most pixels with confident logits; class 2 is under-predicted: its own logit barely
    beats the others, so its positive distribution sits far below the pooled positive anchor."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros((n, h, w), dtype=torch.long)
    labels[:, :, : w // 4] = 1
    labels[:, :6, w // 2 :] = 2
    z = torch.randn((n, 3, h, w), generator=g) * 0.3
    own = torch.where(labels == 2, 0.6, 4.0) + torch.randn((n, h, w), generator=g) * 0.3
    z.scatter_(1, labels[:, None], own[:, None])
    return z, labels


def _cfg(arm: str, *extra: str) -> TrainConfig:
    return load_config(
        arm,
        overrides=[
            "model.num_classes=3",
            "blda.start_iter=0",
            "blda.t=0.5",
            "blda.min_pixels=1",
            "blda.momentum_ramp_iters=1",
            "blda.samples_per_class=512",
            *extra,
        ],
    )


def _state(cfg: TrainConfig, model: nn.Module) -> loop.TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    gmm = GmmState.empty(C, cfg.blda.components) if cfg.blda.enabled else None
    gmm_t = GmmState.empty(C, cfg.blda.components) if cfg.blda.enabled else None
    teacher = EmaTeacher(model) if cfg.self_training.enabled else None
    return loop.TrainState(model, optimizer, scheduler, teacher, gmm, gmm_t)


def _fit_tables(state: loop.TrainState, cfg: TrainConfig, seeds: range) -> None:
    """Estimate the source GMMs from planted batches with the loop's own update, then build the tables."""
    ctx = loop.StepContext(cfg=cfg, domains=None)  # type: ignore[arg-type]
    for i, seed in enumerate(seeds):
        z, y = _planted(seed)
        state.iteration = i
        loop._source_loss(state, ctx, Batch(z, y), False, torch.Generator().manual_seed(seed))
    state.gmm_target = state.gmm_source
    loop.refresh_tables(state, cfg)


def _margin_after_step(cfg: TrainConfig, correcting: bool, tables_from: loop.TrainState | None) -> float:
    model = BiasNet()
    state = _state(cfg, model)
    if tables_from is not None:
        state.gmm_source, state.gmm_target = tables_from.gmm_source, tables_from.gmm_target
        state.anchors, state.shift_source = tables_from.anchors, tables_from.shift_source
        state.shift_target = tables_from.shift_target
    ctx = loop.StepContext(cfg=cfg, domains=None)  # type: ignore[arg-type]
    z, y = _planted(99)
    state.optimizer.zero_grad()
    loop._source_loss(state, ctx, Batch(z, y), correcting, torch.Generator().manual_seed(0)).backward()
    state.optimizer.step()
    b = model.bias.detach()
    return float(b[2] - b[0])


def test_one_blda_step_raises_the_under_predicted_class_more_than_plain_ce() -> None:
    cfg = _cfg("blda")
    fitted = _state(cfg, BiasNet())
    _fit_tables(fitted, cfg, range(6))
    assert fitted.shift_source is not None
    # The planted bias shows in the tables: class 2's positive logits are lifted toward the anchor.
    z, y = _planted(99)
    d = shift_for_labels(z, y, fitted.shift_source)
    assert float(d[:, 2][y == 2].mean()) > 0.5
    plain = _margin_after_step(_cfg("self-training"), False, None)
    corrected = _margin_after_step(cfg, True, fitted)
    # CE(z − tΔ, y) sees class 2's own logit lowered by tΔ > 0, so it pulls the class-2 prior up harder
    # (a flipped sign pulls it less; no correction pulls it the same).
    assert corrected > plain + 0.02, (corrected, plain)


def _constant_table(value: float, m: int = 8) -> ShiftTable:
    return ShiftTable(torch.zeros(C, C), torch.ones(C, C), torch.full((C, C, m), value))


def test_mixed_batch_uses_source_tables_on_source_pixels_and_target_tables_on_target_pixels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _cfg("blda", "self_training.start_iter=0", "self_training.pseudo_threshold=0.0")
    model = BiasNet()
    state = _state(cfg, model)
    assert state.gmm_source is not None
    state.shift_source, state.shift_target = _constant_table(0.5), _constant_table(-0.7)
    seen: dict[str, Any] = {}
    real_classmix, real_corrected = loop.classmix, loop.corrected_logits

    def record_mix(*args: Any) -> Any:
        seen["mixed"] = real_classmix(*args)
        return seen["mixed"]

    def record_delta(logits: torch.Tensor, delta: torch.Tensor, t: float) -> torch.Tensor:
        seen.setdefault("deltas", []).append(delta)
        return real_corrected(logits, delta, t)

    monkeypatch.setattr(loop, "classmix", record_mix)
    monkeypatch.setattr(loop, "corrected_logits", record_delta)
    ctx = loop.StepContext(cfg=cfg, domains=None)  # type: ignore[arg-type]
    zs, ys = _planted(1)
    zt, _ = _planted(2)
    gens = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    loop._mixed_loss(state, ctx, Batch(zs, ys), Batch(zt, None), True, *gens)
    (delta,) = seen["deltas"]
    mixed = seen["mixed"]
    src, tgt = mixed.source_mask, ~mixed.source_mask
    assert bool(src.any()) and bool(tgt.any())
    assert torch.all(delta.permute(1, 0, 2, 3)[:, src] == 0.5)
    assert torch.all(delta.permute(1, 0, 2, 3)[:, tgt] == -0.7)


def test_target_correction_off_leaves_target_pixels_uncorrected(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg("blda", "self_training.start_iter=0", "blda.correct_target=false")
    state = _state(cfg, BiasNet())
    state.shift_source, state.shift_target = _constant_table(0.5), _constant_table(-0.7)
    deltas: list[torch.Tensor] = []
    real = loop.corrected_logits
    monkeypatch.setattr(loop, "corrected_logits", lambda z, d, t: (deltas.append(d), real(z, d, t))[1])
    ctx = loop.StepContext(cfg=cfg, domains=None)  # type: ignore[arg-type]
    zs, ys = _planted(1)
    gens = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    loop._mixed_loss(state, ctx, Batch(zs, ys), Batch(_planted(2)[0], None), True, *gens)
    assert set(torch.unique(deltas[0]).tolist()) <= {0.0, 0.5} and bool((deltas[0] == 0).any())


def test_stacked_tables_equal_the_per_domain_look_ups() -> None:
    g = torch.Generator().manual_seed(0)
    tables = [
        ShiftTable(
            torch.randn(C, C, generator=g),
            torch.rand(C, C, generator=g) + 0.1,
            torch.randn(C, C, 16, generator=g),
        )
        for _ in range(2)
    ]
    z = torch.randn(2, C, 5, 7, generator=g) * 3
    y = torch.randint(0, C, (2, 5, 7), generator=g)
    y[0, 0, 0] = 255
    domain = torch.randint(0, 2, (2, 5, 7), generator=g)
    got = shift_for_labels(z, y, stack_tables(tables), domain)
    each = [shift_for_labels(z, y, t) for t in tables]
    want = torch.where(domain[:, None] == 0, each[0], each[1])
    torch.testing.assert_close(got, want)
    assert torch.all(got[0, :, 0, 0] == 0)  # ignored pixels get no shift


def _gmm(mean: float, counts: float = 100.0) -> GmmState:
    g = GmmState.empty(C, 2)
    eye = torch.eye(C, dtype=torch.bool)[..., None]
    means = torch.where(eye, torch.full((C, C, 2), mean), torch.full((C, C, 2), -mean))
    return GmmState(
        g.weights,
        means + torch.tensor([0.0, 0.5], dtype=torch.float64),
        g.stds,
        torch.full((C, C), counts, dtype=torch.float64),
        torch.ones((C, C), dtype=torch.int64),
        torch.zeros((C, C), dtype=torch.int64),
    )


def test_anchors_are_pooled_from_the_source_gmms_only() -> None:
    cfg = _cfg("blda")
    state = _state(cfg, BiasNet())
    state.gmm_source, state.gmm_target = _gmm(3.0), _gmm(9.0)
    loop.refresh_tables(state, cfg)
    assert state.anchors is not None
    reference = build_anchors(_gmm(3.0))
    torch.testing.assert_close(state.anchors.positive.x, reference.positive.x)
    torch.testing.assert_close(state.anchors.negative.p, reference.negative.p)
    # The target tables map the target pairs onto those source anchors: a target shifted by +6 is pulled
    # down by about 6 (it would be ~0 if the anchors came from the target).
    assert state.shift_target is not None
    assert float(state.shift_target.delta[0, 0].mean()) < -4.0


def test_class_weighted_anchors_weight_every_seen_class_equally() -> None:
    state = _gmm(2.0)
    state.counts[0, 0] = 1e6
    (w_pix, _, _), _ = pooled_anchors(state, "pixels")
    (w_cls, _, _), _ = pooled_anchors(state, "classes")
    per_class_pix = w_pix.reshape(C, -1).sum(-1)
    per_class_cls = w_cls.reshape(C, -1).sum(-1)
    assert float(per_class_pix[0]) > 0.99
    torch.testing.assert_close(per_class_cls, torch.full((C,), 1 / C, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 'pixels' or 'classes'"):
        pooled_anchors(state, "frequency")


def _row_table(m: int = 8) -> ShiftTable:
    """Δ_{c,l} = 0.1·(c + 1) everywhere: the value tells which true-class row a pixel was corrected with."""
    rows = 0.1 * (torch.arange(C, dtype=torch.float32) + 1)
    return ShiftTable(torch.zeros(C, C), torch.ones(C, C), rows.view(C, 1, 1).expand(C, C, m).contiguous())


def test_label_resolution_delta_reaches_a_class_that_nearest_downsampling_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-pixel-wide class at label resolution vanishes from stride-2 nearest-downsampled labels, so
    the "logits" resolution gives it no correction of its own; "labels" (the reference) does."""
    z, y = _planted(5)
    y[:, 8:, 21] = 2  # an odd column in class-0 ground: nearest downsampling by 2 keeps even columns only
    thin = torch.zeros_like(y, dtype=torch.bool)
    thin[:, 8:, 21] = True
    seen: list[torch.Tensor] = []
    real = loop.corrected_logits
    monkeypatch.setattr(loop, "corrected_logits", lambda a, d, t: (seen.append(d), real(a, d, t))[1])
    for resolution in ("labels", "logits"):
        cfg = _cfg("blda", f"blda.delta_resolution={resolution}")
        state = _state(cfg, BiasNet(stride=2))
        state.shift_source = _row_table()
        ctx = loop.StepContext(cfg=cfg, domains=None)  # type: ignore[arg-type]
        loop._source_loss(state, ctx, Batch(z, y), True, torch.Generator().manual_seed(0))
    at_labels, at_logits = seen
    assert at_labels.shape[-2:] == y.shape[-2:] and at_logits.shape[-2:] == (16, 16)
    torch.testing.assert_close(at_labels[:, 0][thin], torch.full((int(thin.sum()),), 0.3))
    # At stride 2 those pixels are read as their class-0 neighbours: row 0 of the table, never row 2.
    torch.testing.assert_close(at_logits[:, 0, 4:, 10], torch.full((2, 12), 0.1))


def test_a_gmm_row_needs_the_minimum_pixel_count() -> None:
    z, y = _planted(3)
    flat_z, flat_y = z.permute(0, 2, 3, 1).reshape(-1, C), y.reshape(-1)
    rows = torch.bincount(flat_y, minlength=C)
    threshold = int(rows[2]) + 1  # class 2 has fewer pixels than this, classes 0 and 1 more
    assert rows[0] >= threshold and rows[1] >= threshold
    state = update_gmm(
        GmmState.empty(C, 2), flat_z, flat_y, 0, OnlineGmmConfig(components=2, min_pixels=threshold)
    )
    assert state.initialized.tolist() == [[True] * C, [True] * C, [False] * C]
    state = update_gmm(GmmState.empty(C, 2), flat_z, flat_y, 0, OnlineGmmConfig(components=2, min_pixels=1))
    assert bool(state.initialized.all())


def test_t_ramps_linearly_after_the_start() -> None:
    cfg = _cfg("blda", "blda.start_iter=10", "blda.t_ramp_iters=4", "blda.t=0.2")
    assert [loop.correction_strength(cfg, i) for i in (9, 10, 11, 13, 50)] == pytest.approx(
        [0, 0.05, 0.1, 0.2, 0.2]
    )
    assert loop.correction_strength(_cfg("blda", "blda.start_iter=10", "blda.t=0.2"), 10) == 0.2


def test_bottom_rows_carry_no_pseudo_label_weight() -> None:
    w = loop._pseudo_weight_map(0.8, (2, 20, 6), 0.15)
    assert torch.all(w[:, :17] == 0.8) and torch.all(w[:, 17:] == 0)
    assert torch.all(loop._pseudo_weight_map(0.8, (2, 20, 6), 0.0) == 0.8)


def test_warm_start_loads_the_checkpoint_weights_into_student_and_teacher(tmp_path: Path) -> None:
    from training.checkpoint import Checkpoint, save_checkpoint
    from training.networks import build_network

    torch.manual_seed(123)
    source = build_network("mobilenet_lraspp_tiny", 6)
    path = save_checkpoint(
        tmp_path / "so.pt", Checkpoint(config=TrainConfig(), iteration=5, model=source.state_dict())
    )
    cfg = load_config(
        "self-training",
        overrides=[
            "model.network=mobilenet_lraspp_tiny",
            "model.num_classes=6",
            f"model.init_checkpoint={path}",
        ],
    )
    state = loop.build_state(cfg)
    assert state.teacher is not None
    for name, value in source.state_dict().items():
        assert torch.equal(state.model.state_dict()[name], value), name
        assert torch.equal(state.teacher.state_dict()[name], value), name
    tiny = ["model.network=mobilenet_lraspp_tiny", "model.num_classes=6"]
    bad = load_config("self-training", overrides=[*tiny, f"model.init_checkpoint={tmp_path / 'nope.pt'}"])
    with pytest.raises(FileNotFoundError, match=r"model\.init_checkpoint"):
        loop.build_state(bad)
    wrong = load_config(
        "self-training", overrides=["model.network=mobilenet_lraspp_tiny", f"model.init_checkpoint={path}"]
    )
    with pytest.raises(ValueError, match="expected weights of mobilenet_lraspp_tiny"):
        loop.build_state(wrong)
