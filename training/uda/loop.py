"""The training loop: source-only, self-training (DACS-style) and self-training + BLDA.

Corrections are applied at the logits' resolution, where the logits live: with label-resolution losses the
corrected logits z − tΔ(z) are upsampled, which is the same as upsampling z and Δ separately (bilinear
interpolation is linear) at a quarter of the cost; Δ uses nearest-downsampled labels and domain masks.

`train_step` only orchestrates the components (gmm, losses, teacher, pseudo_labels, mixing). All randomness
of iteration i comes from generators seeded by (seed, i, rank), and the global torch RNG (dropout) is reseeded
the same way, so a resumed run continues exactly and a run is deterministic on CPU.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.labels import IGNORE_INDEX
from training import distributed as dist_utils
from training.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_init_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import TrainConfig
from training.datasets import (
    Batch,
    CropSpec,
    EvalImages,
    NumpyDataset,
    TrainCrops,
    collate,
    draw_indices,
    iteration_seed,
    source_class_counts,
)
from training.networks import IMAGE_MEAN, IMAGE_STD, build_network
from training.uda.gmm import (
    Anchors,
    AnchorTable,
    GmmState,
    OnlineGmmConfig,
    ShiftTable,
    build_anchors,
    build_shift_table,
    calibrated_scores,
    gmm_cdf,
    shift_for_labels,
    stack_tables,
    update_gmm,
    zero_table,
)
from training.uda.losses import cdf_loss, corrected_logits, weighted_cross_entropy
from training.uda.mixing import Mixed, class_masks, classmix, strong_augment
from training.uda.pseudo_labels import pseudo_labels_from_probs, teacher_probabilities
from training.uda.teacher import EmaTeacher, ema_alpha

STREAM_SOURCE, STREAM_TARGET, STREAM_STEP = 1, 2, 3


@dataclass
class Domains:
    """The numpy datasets of a run; rcs: a rare-class sampler over the source (built when None and
    data.rare_class_sampling is set)."""

    source: NumpyDataset
    target_train: NumpyDataset
    target_val: NumpyDataset
    rcs: Any | None = None
    prescale: float = 1.0  # the datasets were already rescaled by this factor (training.datasets.prescaled)


@dataclass
class TrainState:
    model: nn.Module  # the student on its device, possibly wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    teacher: EmaTeacher | None = None
    gmm_source: GmmState | None = None
    gmm_target: GmmState | None = None
    iteration: int = 0  # iterations completed
    anchors: Anchors | None = None
    shift_source: ShiftTable | None = None
    shift_target: ShiftTable | None = None
    # Loss scaling for float16 autocast (a no-op when disabled: float32, or bfloat16 which needs none).
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cuda", enabled=False))


@dataclass
class StepContext:
    cfg: TrainConfig
    domains: Domains
    rank: int = 0
    world_size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] = dist_utils.all_reduce_sum
    gather: Callable[[torch.Tensor], torch.Tensor] = dist_utils.all_gather_cat
    crops: dict[str, TrainCrops] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None  # autocast dtype of the forward passes (optim.amp); None: float32


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then polynomial decay to 0 at the last iteration."""
    warm, total, power = cfg.optim.warmup_iters, cfg.optim.iterations, cfg.optim.poly_power

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        return max(0.0, 1.0 - (it - warm) / max(1, total - warm)) ** power

    return factor


def gmm_config(cfg: TrainConfig) -> OnlineGmmConfig:
    b = cfg.blda
    return OnlineGmmConfig(
        components=b.components,
        em_steps=b.em_steps,
        samples_per_class=b.samples_per_class,
        momentum=b.momentum,
        momentum_ramp_iters=b.momentum_ramp_iters,
        catchup_after=b.catchup_after,
        catchup_momentum=b.catchup_momentum,
        min_pixels=b.min_pixels,
    )


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """optim.amp: bfloat16 autocast (no loss scaling needed), float16 on GPUs without bfloat16."""
    if not cfg.optim.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def build_state(
    cfg: TrainConfig,
    world_size: int = 1,
    rank: int = 0,
    plan: dist_utils.DevicePlan | None = None,
    local_rank: int | None = None,
) -> TrainState:
    """Network, teacher, optimiser and GMM states on the plan's device (the CPU by default)."""
    plan = plan or dist_utils.DevicePlan("cpu", "gloo", None)
    device = torch.device(plan.device)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model.network, cfg.model.num_classes)
    if cfg.model.init_checkpoint:
        weights = load_init_weights(cfg.model.init_checkpoint)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(
                f"model.init_checkpoint: expected weights of {cfg.model.network}, got: {str(err).splitlines()[0]}"
            ) from err
    # On the device before the teacher copies it and the optimiser takes its parameters.
    model = model.to(device)
    teacher = EmaTeacher(model) if cfg.self_training.enabled else None
    info = dist_utils.DistInfo(
        rank=rank, world_size=world_size, local_rank=rank if local_rank is None else local_rank
    )
    wrapped = dist_utils.wrap_ddp(model, info, plan.device_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    gs = gt = None
    if cfg.blda.enabled:
        gs = GmmState.empty(cfg.model.num_classes, cfg.blda.components).to(device)
        gt = GmmState.empty(cfg.model.num_classes, cfg.blda.components).to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(cfg, device) == torch.float16)
    return TrainState(wrapped, optimizer, scheduler, teacher, gs, gt, scaler=scaler)


def _to(batch: Batch, device: torch.device) -> Batch:
    if batch.images.device == device:
        return batch
    labels = batch.labels.to(device, non_blocking=True) if batch.labels is not None else None
    return Batch(batch.images.to(device, non_blocking=True), labels)


def _forward(model: nn.Module, images: torch.Tensor, ctx: StepContext) -> Any:
    """The network's outputs, under autocast with optim.amp; returned in float32, since the GMM updates,
    tables and losses after it need float32 (the tables are float64 inside)."""
    if ctx.amp_dtype is None:
        return model(images)
    with torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype):
        out = model(images)
    return type(out)(*(t.float() if isinstance(t, torch.Tensor) else t for t in out))


def _teacher_logits(
    teacher: EmaTeacher, images: torch.Tensor, ctx: StepContext, batch_stats: bool
) -> torch.Tensor:
    if ctx.amp_dtype is None:
        return teacher(images, batch_stats=batch_stats)
    with torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype):
        return teacher(images, batch_stats=batch_stats).float()


def _crops(ctx: StepContext) -> dict[str, TrainCrops]:
    if not ctx.crops:
        d = ctx.cfg.data
        pre = ctx.domains.prescale
        spec = CropSpec(d.crop_height, d.crop_width, d.scale_min / pre, d.scale_max / pre)
        ctx.crops["source"] = TrainCrops(ctx.domains.source, spec, labelled=True)
        ctx.crops["target"] = TrainCrops(ctx.domains.target_train, spec, labelled=False)
    return ctx.crops


def load_batches(ctx: StepContext, iteration: int) -> tuple[Batch, Batch | None]:
    cfg = ctx.cfg
    crops = _crops(ctx)
    keys = draw_indices(
        len(crops["source"]),
        cfg.data.batch_source,
        iteration_seed(cfg.seed, iteration, ctx.rank, STREAM_SOURCE),
        ctx.domains.rcs if cfg.data.rare_class_sampling else None,
    )
    source = _to(collate([crops["source"][k] for k in keys]), ctx.device)
    target = None
    if cfg.self_training.enabled:
        tkeys = draw_indices(
            len(crops["target"]),
            cfg.data.batch_target,
            iteration_seed(cfg.seed, iteration, ctx.rank, STREAM_TARGET),
        )
        target = _to(collate([crops["target"][k] for k in tkeys]), ctx.device)
    return source, target


def _down_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, H, W) -> (N, h, w) nearest."""
    if labels.shape[-2:] == size:
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _pixels(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N·h·w, C) detached."""
    return logits.detach().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def _loss_inputs(logits: torch.Tensor, labels: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels at the loss resolution: upsampled logits (full) or downsampled labels."""
    if full:
        if logits.shape[-2:] == labels.shape[-2:]:  # already upsampled (Δ at label resolution)
            return logits, labels
        return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False), labels
    return logits, _down_labels(labels, logits.shape[-2:])


def _cdf_targets(
    logits_low: torch.Tensor,  # (N, C, h, w)
    labels_low: torch.Tensor,  # (N, h, w)
    gmms: list[GmmState],  # one per domain
    domain: torch.Tensor | None = None,  # (N, h, w) index into `gmms`; None: all pixels use gmms[0]
) -> tuple[torch.Tensor, torch.Tensor]:
    """F_yy(z_y) per pixel under its own domain's mixtures, and where it is defined (labelled, the row
    estimated): ((N, h, w) float, (N, h, w) bool)."""
    with torch.no_grad():
        c = logits_low.shape[1]
        valid = (labels_low >= 0) & (labels_low < c)
        y = torch.where(valid, labels_low, torch.zeros_like(labels_low))
        zy = torch.gather(logits_low.detach(), 1, y[:, None])[:, 0].double()  # (N, h, w)
        dom = torch.zeros_like(y) if domain is None else domain.long()
        q = torch.zeros_like(zy)
        for d, gmm in enumerate(gmms):
            w, m, s = gmm.weights[y, y], gmm.means[y, y], gmm.stds[y, y]  # (N, h, w, K)
            here = dom == d
            q = torch.where(here, gmm_cdf(zy[..., None], w, m, s)[..., 0], q)
            valid = valid & (~here | gmm.initialized.diagonal()[y])
        return torch.where(valid, q, torch.zeros_like(q)).float(), valid


def refresh_tables(state: TrainState, cfg: TrainConfig) -> None:
    """Anchors (from the source GMMs only) and both domains' pair tables, rebuilt together."""
    assert state.gmm_source is not None and state.gmm_target is not None
    if not bool(state.gmm_source.initialized.diagonal().any()):
        return
    b = cfg.blda
    state.anchors = build_anchors(state.gmm_source, weighting=b.anchor_weighting)
    state.shift_source = build_shift_table(state.gmm_source, state.anchors, b.table_knots, b.eps)
    state.shift_target = build_shift_table(state.gmm_target, state.anchors, b.table_knots, b.eps)


def correction_strength(cfg: TrainConfig, iteration: int) -> float:
    """t of the corrected CE at an iteration: 0 before blda.start_iter, then t (ramped over t_ramp_iters)."""
    b = cfg.blda
    if iteration < b.start_iter:
        return 0.0
    if b.t_ramp_iters <= 0:
        return b.t
    return b.t * min(1.0, (iteration - b.start_iter + 1) / b.t_ramp_iters)


def _delta_inputs(
    logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and labels that Δ and the GMM samples are taken from: upsampled logits with the labels
    ("labels", the reference) or the logits with nearest-downsampled labels ("logits")."""
    if cfg.blda.delta_resolution == "labels":
        return _loss_inputs(logits, labels, full=True)
    return logits, _down_labels(labels, logits.shape[-2:])


def _update(
    state: GmmState,
    logits: torch.Tensor,
    labels: torch.Tensor,
    it: int,
    ctx: StepContext,
    gen: torch.Generator,
) -> GmmState:
    return update_gmm(
        state, _pixels(logits), labels.reshape(-1), it, gmm_config(ctx.cfg), gen, ctx.reduce, ctx.gather
    )


def _corrected(
    logits: torch.Tensor,  # (N, C, h, w) the Δ inputs (with gradient)
    labels: torch.Tensor,  # (N, h, w)
    table: ShiftTable,
    t: float,
    domain: torch.Tensor | None = None,
) -> torch.Tensor:
    return corrected_logits(logits, shift_for_labels(logits, labels, table, domain), t)


def _source_loss(
    state: TrainState, ctx: StepContext, source: Batch, correcting: bool, gmm_gen: torch.Generator
) -> torch.Tensor:
    """(Corrected) CE on the labelled source batch, plus the CDF-head loss; updates the source GMMs."""
    cfg, b = ctx.cfg, ctx.cfg.blda
    it = state.iteration
    assert source.labels is not None
    out = _forward(state.model, source.images, ctx)
    full = cfg.optim.loss_resolution == "full"
    z, y = _delta_inputs(out.logits, source.labels, cfg) if b.enabled else (out.logits, source.labels)
    if b.enabled:
        assert state.gmm_source is not None
        state.gmm_source = _update(state.gmm_source, z, y, it, ctx, gmm_gen)
    if correcting and b.correct_source:
        assert state.shift_source is not None
        z = _corrected(z, y, state.shift_source, correction_strength(cfg, it))
    logits, labels = _loss_inputs(z, source.labels, full)
    loss = weighted_cross_entropy(logits, labels)
    if b.enabled and b.cdf_weight > 0 and state.gmm_source is not None:
        src_low = _down_labels(source.labels, out.logits.shape[-2:])
        target, valid = _cdf_targets(out.logits, src_low, [state.gmm_source])
        loss = loss + b.cdf_weight * cdf_loss(out.cdf, target, valid)
    return loss


def _pseudo_weight_map(
    weight: float, shape: Sequence[int], ignore_bottom: float, device: torch.device | None = None
) -> torch.Tensor:
    """(N, H, W) pseudo-label weights: DACS' scalar confidence share, 0 on the ignored bottom rows."""
    w = torch.full(tuple(shape), weight, device=device)
    rows = round(shape[-2] * ignore_bottom)
    if rows > 0:
        w[..., shape[-2] - rows :, :] = 0.0
    return w


def _mixed_loss(
    state: TrainState,
    ctx: StepContext,
    source: Batch,
    target: Batch,
    correcting: bool,
    gen: torch.Generator,
    gmm_gen: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """ClassMix of source into target with the teacher's pseudo-labels: the (corrected) weighted CE of
    the mixed batch, and the mean pseudo-label weight; updates the target GMMs on target pixels only."""
    cfg, st, b = ctx.cfg, ctx.cfg.self_training, ctx.cfg.blda
    it = state.iteration
    assert state.teacher is not None and source.labels is not None
    full = cfg.optim.loss_resolution == "full"
    t_logits = _teacher_logits(state.teacher, target.images, ctx, batch_stats=st.teacher_bn == "batch")
    size = (target.images.shape[-2], target.images.shape[-1])
    scores = None
    if correcting and b.correct_pseudo_labels and state.shift_target is not None:
        table = state.shift_target

        def scores(z: torch.Tensor) -> torch.Tensor:
            return calibrated_scores(z, table, b.pseudo_tau, b.pseudo_top_k)

    probs = teacher_probabilities(t_logits, size, scores)
    pl = pseudo_labels_from_probs(probs, st.pseudo_threshold, ctx.reduce)
    ramp = min(1.0, (it - st.start_iter + 1) / max(1, st.ramp_iters))
    mask = (
        class_masks(source.labels, gen) if st.classmix else torch.zeros_like(source.labels, dtype=torch.bool)
    )
    pseudo_weight = _pseudo_weight_map(pl.weight, pl.labels.shape, st.pseudo_ignore_bottom, pl.labels.device)
    mixed = classmix(source.images, source.labels, target.images, pl.labels, pseudo_weight, mask)
    mean = torch.tensor(IMAGE_MEAN, device=mixed.images.device)
    std = torch.tensor(IMAGE_STD, device=mixed.images.device)
    images = strong_augment(mixed.images, mean, std, cfg.data.color_jitter, cfg.data.blur, gen)
    out_m = _forward(state.model, images, ctx)
    z = (
        _blda_mixed(state, ctx, out_m.logits, mixed, pl.confidence, correcting, gmm_gen)
        if b.enabled
        else out_m.logits
    )
    logits_m, labels_m = _loss_inputs(z, mixed.labels, full)
    weights = mixed.weights if full else _down_weights(mixed.weights, logits_m.shape[-2:])
    loss = weighted_cross_entropy(logits_m, labels_m, weights * ramp)
    if b.enabled and b.cdf_weight > 0 and b.cdf_target:
        assert state.gmm_source is not None and state.gmm_target is not None
        low = out_m.logits.shape[-2:]
        dom_low = _down_labels((~mixed.source_mask).long(), low)
        target_q, valid = _cdf_targets(
            out_m.logits, _down_labels(mixed.labels, low), [state.gmm_source, state.gmm_target], dom_low
        )
        valid = valid & (_down_weights(mixed.weights, low) > 0)
        loss = loss + b.cdf_weight * cdf_loss(out_m.cdf, target_q, valid) * ramp
    return loss, pl.weight


def _blda_mixed(
    state: TrainState,
    ctx: StepContext,
    logits: torch.Tensor,  # (N, C, h, w) student logits of the mixed batch
    mixed: Mixed,
    confidence: torch.Tensor,  # (N, H, W) teacher confidence of the target pixels
    correcting: bool,
    gmm_gen: torch.Generator,
) -> torch.Tensor:
    """BLDA on the mixed batch: the target GMMs updated from its target pixels only, then the logits the loss
    sees (at the Δ resolution), corrected with source tables on source pixels and target tables on target
    pixels."""
    cfg, b = ctx.cfg, ctx.cfg.blda
    z, y = _delta_inputs(logits, mixed.labels, cfg)
    domain = _down_labels((~mixed.source_mask).long(), z.shape[-2:])  # 0 source, 1 target
    if b.track_target:
        assert state.gmm_target is not None
        # Target pixels that carry a pseudo-label weight (not the ignored rows), optionally confident.
        keep = (domain == 1) & (_down_weights(mixed.weights, z.shape[-2:]) > 0)
        if b.target_gmm_confidence > 0:
            keep = keep & (_down_weights(confidence, z.shape[-2:]) > b.target_gmm_confidence)
        tgt_only = torch.where(keep, y, torch.full_like(y, IGNORE_INDEX))
        state.gmm_target = _update(state.gmm_target, z, tgt_only, state.iteration, ctx, gmm_gen)
    if not (correcting and (b.correct_source or b.correct_target)):
        return z
    assert state.shift_source is not None and state.shift_target is not None
    src = state.shift_source if b.correct_source else zero_table(state.shift_source)
    tgt = state.shift_target if b.correct_target else zero_table(state.shift_target)
    return _corrected(z, y, stack_tables([src, tgt]), correction_strength(cfg, state.iteration), domain)


def train_step(state: TrainState, ctx: StepContext) -> dict[str, float]:
    """One iteration: source loss, mixed target loss, optimiser and teacher updates, table refresh."""
    cfg = ctx.cfg
    it = state.iteration
    st, b = cfg.self_training, cfg.blda
    torch.manual_seed(iteration_seed(cfg.seed, it, ctx.rank, STREAM_STEP))  # dropout
    gen = torch.Generator().manual_seed(iteration_seed(cfg.seed, it, ctx.rank, STREAM_STEP + 1))
    # The GMMs draw from their own stream, so the arms share every other random choice (paired runs).
    gmm_gen = torch.Generator().manual_seed(iteration_seed(cfg.seed, it, ctx.rank, STREAM_STEP + 2))
    source, target = load_batches(ctx, it)
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    correcting = b.enabled and it >= b.start_iter and state.shift_source is not None

    loss_src = _source_loss(state, ctx, source, correcting, gmm_gen)
    state.scaler.scale(loss_src).backward()
    metrics = {"loss_source": float(loss_src.detach())}
    if st.enabled and target is not None and it >= st.start_iter:
        loss_mix, pseudo_weight = _mixed_loss(state, ctx, source, target, correcting, gen, gmm_gen)
        state.scaler.scale(loss_mix).backward()
        metrics["loss_mix"] = float(loss_mix.detach())
        metrics["pseudo_weight"] = pseudo_weight

    if cfg.optim.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.teacher is not None:
        state.teacher.update(dist_utils.unwrap(state.model), ema_alpha(it, st.ema_alpha))
    state.iteration = it + 1
    if b.enabled and (state.iteration % b.table_every == 0 or state.shift_source is None):
        refresh_tables(state, cfg)
    metrics["lr"] = state.optimizer.param_groups[0]["lr"]
    return metrics


def _down_weights(weights: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, H, W) float -> (N, h, w) nearest."""
    if weights.shape[-2:] == tuple(size):
        return weights
    return F.interpolate(weights[:, None], size=tuple(size), mode="nearest")[:, 0]


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> logits upsampled to (N, C, H, W)."""
    logits = model(images).logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: EvalImages, num_classes: int, batch: int = 4) -> dict[str, Any]:
    """The metrics of `blda evaluate` (fractions: mIoU, per-class IoU, class-IoU std, Bias(l)) on whole
    images, with the network's own upsampling of the logits to the label size."""
    from calibration.bias import confusion_matrix
    from training.evaluation.evaluate import class_metrics

    net = dist_utils.unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch))]
        b = collate(items)
        assert b.labels is not None
        pred = predict(net, b.images.to(device)).argmax(1).cpu().numpy()
        conf += confusion_matrix(pred, b.labels.numpy(), num_classes)
    net.train(was_training)
    return {**class_metrics(conf), "images": len(dataset)}


def _cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in weights.items()}


def _checkpoint(state: TrainState, cfg: TrainConfig, metrics: dict[str, Any]) -> Checkpoint:
    # Weights, GMM states and tables are saved on the CPU, so a GPU run's checkpoint loads (and exports,
    # and evaluates) anywhere; the optimiser state is moved back to the parameters' device on load.
    tables = _tables_dict(state)
    return Checkpoint(
        config=cfg,
        iteration=state.iteration,
        model=_cpu(dist_utils.unwrap(state.model).state_dict()),
        teacher=_cpu(state.teacher.state_dict()) if state.teacher is not None else None,
        optimizer=state.optimizer.state_dict(),
        scheduler=state.scheduler.state_dict(),
        gmm_source=state.gmm_source.to("cpu") if state.gmm_source is not None else None,
        gmm_target=state.gmm_target.to("cpu") if state.gmm_target is not None else None,
        rng=rng_state(),
        tables=_cpu(tables) if tables is not None else None,
        metrics=metrics,
    )


def restore(state: TrainState, ckpt: Checkpoint, cfg: TrainConfig) -> None:
    dist_utils.unwrap(state.model).load_state_dict(ckpt.model)
    if state.teacher is not None and ckpt.teacher is not None:
        state.teacher.load_state_dict(ckpt.teacher)
    if ckpt.optimizer is not None:
        state.optimizer.load_state_dict(ckpt.optimizer)
    if ckpt.scheduler is not None:
        state.scheduler.load_state_dict(ckpt.scheduler)
    device = next(dist_utils.unwrap(state.model).parameters()).device
    state.gmm_source = ckpt.gmm_source.to(device) if ckpt.gmm_source is not None else None
    state.gmm_target = ckpt.gmm_target.to(device) if ckpt.gmm_target is not None else None
    state.iteration = ckpt.iteration
    if ckpt.rng is not None:
        set_rng_state(ckpt.rng)
    if ckpt.tables is not None:
        _load_tables(state, {k: v.to(device) for k, v in ckpt.tables.items()})


def _tables_dict(state: TrainState) -> dict[str, torch.Tensor] | None:
    if state.anchors is None or state.shift_source is None or state.shift_target is None:
        return None
    out = {
        "anchor_pos_x": state.anchors.positive.x,
        "anchor_pos_p": state.anchors.positive.p,
        "anchor_neg_x": state.anchors.negative.x,
        "anchor_neg_p": state.anchors.negative.p,
    }
    for name, table in (("source", state.shift_source), ("target", state.shift_target)):
        out.update({f"{name}_lo": table.lo, f"{name}_step": table.step, f"{name}_delta": table.delta})
    return out


def _load_tables(state: TrainState, t: dict[str, torch.Tensor]) -> None:
    state.anchors = Anchors(
        AnchorTable(t["anchor_pos_x"], t["anchor_pos_p"]), AnchorTable(t["anchor_neg_x"], t["anchor_neg_p"])
    )
    state.shift_source = ShiftTable(t["source_lo"], t["source_step"], t["source_delta"])
    state.shift_target = ShiftTable(t["target_lo"], t["target_step"], t["target_delta"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code draws from the global RNG)
    torch.manual_seed(seed)


def run_training(
    cfg: TrainConfig,
    domains: Domains,
    out_dir: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    evaluate_at_end: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Run (or resume) training; writes out_dir/{config.json, metrics.jsonl, checkpoint.pt, last.pt,
    eval.json}. `stop_at` ends early after that many iterations (tests of exact resume). `device`:
    auto (CUDA when available), cpu or cuda (training.distributed.choose_device)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = dist_utils.device_plan(device)
    info = dist_utils.init_from_env(plan)
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    state = build_state(cfg, info.world_size, info.rank, plan, info.local_rank)
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.config != cfg:
            cfg = replace(ckpt.config)
        restore(state, ckpt, cfg)
    if cfg.data.rare_class_sampling and domains.rcs is None:
        from training.data.sampling import RareClassSampler

        counts = source_class_counts(domains.source, cfg.model.num_classes)
        domains = replace(
            domains, rcs=RareClassSampler(counts, cfg.data.rcs_temperature, cfg.data.rcs_min_pixels)
        )
    ctx = StepContext(
        cfg=cfg,
        domains=domains,
        rank=info.rank,
        world_size=info.world_size,
        device=torch.device(plan.device),
        amp_dtype=amp_dtype(cfg, torch.device(plan.device)),
    )
    if info.is_main:
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))
    total = cfg.optim.iterations if stop_at is None else min(stop_at, cfg.optim.iterations)
    log = (out / "metrics.jsonl").open("a") if info.is_main else None
    bar = _progress(cfg, info.is_main, state.iteration, total)
    eval_set = EvalImages(domains.target_val, cfg.data.eval_scale / domains.prescale, cfg.data.val_limit)
    running: dict[str, float] = {}
    finished_before = state.iteration >= cfg.optim.iterations  # resumed a finished run: nothing to redo
    started = time.perf_counter()
    last_eval: dict[str, Any] = {}
    window: list[float] = []  # step times since the last log line
    try:
        while state.iteration < total:
            t0 = time.perf_counter()
            m = train_step(state, ctx)
            window.append(time.perf_counter() - t0)
            # The mean over the logging window: a single step would be biased, since the periodic table
            # rebuilds fall on the same iterations as the log lines.
            m["step_seconds"] = sum(window) / len(window)
            for k, v in m.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            it = state.iteration
            if cfg.log.eval_every > 0 and it % cfg.log.eval_every == 0 and it < total:
                last_eval = evaluate(state.model, eval_set, cfg.model.num_classes)
            if log is not None and (it % cfg.log.log_every == 0 or it == total):
                record = {"iteration": it, **{k: round(v, 6) for k, v in m.items()}}
                if last_eval:
                    record["miou"] = last_eval["miou"]
                log.write(json.dumps(record) + "\n")
                log.flush()
            if it % cfg.log.log_every == 0:
                window.clear()
            if bar is not None:
                shown: dict[str, str] = {
                    k: f"{running[k]:.3f}" for k in ("loss_source", "loss_mix") if k in running
                }
                if last_eval:
                    shown["mIoU"] = f"{100 * last_eval['miou']:.1f}"
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
            if info.is_main and it % cfg.log.checkpoint_every == 0 and it < total:
                save_checkpoint(ckpt_path, _checkpoint(state, cfg, last_eval))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if state.iteration >= cfg.optim.iterations and st_enabled_adabn(cfg) and not finished_before:
        recalibrate_batchnorm(
            dist_utils.unwrap(state.model),
            domains.target_train,
            cfg.data.eval_scale / domains.prescale,
            cfg.self_training.adabn_images,
        )
    train_seconds = time.perf_counter() - started
    result: dict[str, Any] = {"iteration": state.iteration, "train_seconds": train_seconds}
    if evaluate_at_end and state.iteration >= cfg.optim.iterations and info.is_main:
        result.update(evaluate(state.model, eval_set, cfg.model.num_classes))
        (out / "eval.json").write_text(json.dumps({**result, "arm": cfg.arm, "seed": cfg.seed}, indent=2))
    if info.is_main:
        save_checkpoint(ckpt_path, _checkpoint(state, cfg, result))
    dist_utils.barrier()
    result["state"] = state
    return result


def st_enabled_adabn(cfg: TrainConfig) -> bool:
    return cfg.self_training.enabled and cfg.self_training.adabn_images > 0


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: NumpyDataset, scale: float, count: int, batch: int = 8
) -> None:
    """AdaBN: re-estimate BatchNorm running statistics as the plain average over unlabelled target-train
    images (evenly spaced, whole images at the evaluation scale); weights are unchanged."""
    n = min(len(dataset), count)
    if n == 0:
        return
    device = next(model.parameters()).device
    images = EvalImages(dataset, scale, 0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        picks = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
        for start in range(0, n, batch):
            x = collate([_image_only(images, i) for i in picks[start : start + batch]]).images
            model(x.to(device))
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)


def _image_only(images: EvalImages, index: int) -> dict[str, np.ndarray]:
    return {"image": images[index]["image"]}


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    from training.config import to_dict

    return to_dict(cfg)


def _progress(cfg: TrainConfig, main: bool, start: int, total: int) -> Any:
    if not (main and cfg.log.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=cfg.arm, unit="it", dynamic_ncols=True)
