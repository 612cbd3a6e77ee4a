"""Online C×C×K one-dimensional Gaussian mixtures of logit distributions, per domain (torch).

For each pair (c, l), F_cl is the distribution of logit z_l over pixels labelled c. Every iteration:
- `sample_pairs` draws up to S pixels per class (vectorised: one sort, no loop over pairs);
- a few EM steps in log space, warm-started from the running estimate (data-quantile initialisation for
  pairs seen the first time), computed from sufficient statistics (responsibility sums, weighted sums and
  weighted squares about the previous means) that `reduce` all-reduces, so N processes estimate the same
  mixtures as one process on the union of their batches;
- a momentum merge into the running estimate, with a ramped momentum and a catch-up for pairs that were
  missed for a while.

Δ_cl(z) = A⁻¹(clip(F_cl(z), eps, 1 - eps)) − z, A = source positive (c = l) or negative anchor. F_cl uses
torch.special.ndtr; A⁻¹ is a monotone table of the anchor CDF (`AnchorTable`), rebuilt every few iterations.
For the losses, Δ is tabulated per pair on a uniform knot grid (`ShiftTable`, same layout as
calibration.alignment.ShiftTables) and read by linear interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from calibration.labels import IGNORE_INDEX

# Sum-all-reduce over processes (identity on one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]
# Concatenate along dim 0 over processes (identity on one process).
Gather = Callable[[torch.Tensor], torch.Tensor]

STAT_DTYPE = torch.float64
MIN_VAR = 1e-6


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class GmmState:
    """Running per-pair mixtures of one domain; float64 so that merges and exports lose nothing."""

    weights: torch.Tensor  # (C, C, K)
    means: torch.Tensor  # (C, C, K)
    stds: torch.Tensor  # (C, C, K)
    counts: torch.Tensor  # (C, C) float64: pixels seen (before subsampling), cumulated
    updates: torch.Tensor  # (C, C) int64: iterations in which the pair was updated
    last_seen: torch.Tensor  # (C, C) int64: last iteration updated, -1 if never

    @classmethod
    def empty(cls, num_classes: int, k: int) -> GmmState:
        c = num_classes
        return cls(
            weights=torch.full((c, c, k), 1.0 / k, dtype=STAT_DTYPE),
            means=torch.zeros((c, c, k), dtype=STAT_DTYPE),
            stds=torch.ones((c, c, k), dtype=STAT_DTYPE),
            counts=torch.zeros((c, c), dtype=STAT_DTYPE),
            updates=torch.zeros((c, c), dtype=torch.int64),
            last_seen=torch.full((c, c), -1, dtype=torch.int64),
        )

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    @property
    def initialized(self) -> torch.Tensor:  # (C, C) bool
        return self.updates > 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in _FIELDS}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GmmState:
        missing = [name for name in _FIELDS if name not in state]
        if missing:
            raise ValueError(f"GMM state: expected fields {list(_FIELDS)}, missing {missing}")
        return cls(**{name: state[name].clone() for name in _FIELDS})

    def to(self, device: torch.device | str) -> GmmState:
        return GmmState(**{name: getattr(self, name).to(device) for name in _FIELDS})


_FIELDS = ("weights", "means", "stds", "counts", "updates", "last_seen")


@dataclass(frozen=True)
class OnlineGmmConfig:
    components: int = 5
    em_steps: int = 3
    samples_per_class: int = 128
    momentum: float = 0.99
    momentum_ramp_iters: int = 100
    catchup_after: int = 20
    catchup_momentum: float = 0.9
    min_pixels: int = 1  # a row (true class) is updated only from a batch with this many of its pixels


def sample_pairs(
    logits: torch.Tensor,  # (P, C) detached
    labels: torch.Tensor,  # (P,) int, ignore_index for unlabelled
    samples_per_class: int,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to S random pixels per class -> values (C, C, S) [true c, logit l, sample], mask (C, S),
    class_counts (C,) float64 of all labelled pixels (before subsampling)."""
    num_classes = logits.shape[1]
    s = samples_per_class
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    y = labels[valid].long()  # (V,)
    z = logits[valid]  # (V, C)
    class_counts = torch.bincount(y, minlength=num_classes).to(STAT_DTYPE)  # (C,)
    # Sorting by label + U[0, 1) groups pixels by class in a random order within each class.
    # Drawn on the generator's device (the CPU), then moved: a CUDA run draws the same numbers.
    keys = y.to(torch.float64) + torch.rand(y.shape, generator=generator, dtype=torch.float64).to(y.device)
    order = torch.argsort(keys)
    y_sorted = y[order]
    starts = torch.cumsum(class_counts, 0).long() - class_counts.long()  # (C,)
    rank = torch.arange(y.numel(), device=y.device) - starts[y_sorted]  # (V,)
    keep = rank < s
    values = torch.zeros((num_classes, s, num_classes), dtype=logits.dtype, device=logits.device)
    mask = torch.zeros((num_classes, s), dtype=torch.bool, device=logits.device)
    rows, cols = y_sorted[keep], rank[keep]
    values[rows, cols] = z[order][keep]
    mask[rows, cols] = True
    return values.permute(0, 2, 1).contiguous(), mask, class_counts  # (C, C, S), (C, S), (C,)


def quantile_init(
    values: torch.Tensor,  # (C, C, S)
    mask: torch.Tensor,  # (C, S)
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means at the data quantiles (j + 0.5) / K, equal weights, stds from the data spread / K."""
    x = values.to(STAT_DTYPE)
    m = mask[:, None, :].expand_as(x)
    n = m.sum(-1).clamp_min(1)  # (C, C)
    sorted_x = torch.sort(torch.where(m, x, torch.full_like(x, math.inf)), dim=-1).values
    q = (torch.arange(k, dtype=STAT_DTYPE, device=x.device) + 0.5) / k  # (K,)
    idx = torch.floor(q[None, None, :] * (n[..., None] - 1).to(STAT_DTYPE)).long()  # (C, C, K)
    means = torch.gather(sorted_x, -1, idx)
    means = torch.where(torch.isfinite(means), means, torch.zeros_like(means))
    mean = (x * m).sum(-1) / n
    var = ((x - mean[..., None]) ** 2 * m).sum(-1) / n
    std = torch.sqrt(var.clamp_min(MIN_VAR))[..., None] / k  # (C, C, 1)
    # A spread floor keeps components of a constant-valued pair from being degenerate.
    stds = std.clamp_min(1e-2).expand_as(means).clone()
    weights = torch.full_like(means, 1.0 / k)
    return weights, means, stds


def em_statistics(
    values: torch.Tensor,  # (C, C, S)
    mask: torch.Tensor,  # (C, S)
    weights: torch.Tensor,  # (C, C, K)
    means: torch.Tensor,
    stds: torch.Tensor,
) -> torch.Tensor:
    """E-step in log space -> sufficient statistics (3, C, C, K): Σr, Σr(x − μ), Σr(x − μ)² with μ the
    current means (centred so that large logits lose no precision; sums, hence all-reducible)."""
    # float32 with K leading (reductions over K are elementwise across slices; over S contiguous); values
    # are centred on the means, so nothing large cancels.
    x = values.float()[None]  # (1, C, C, S)
    mu = means.float().permute(2, 0, 1)[..., None]  # (K, C, C, 1)
    inv_sd = (1.0 / stds).float().permute(2, 0, 1)[..., None]
    # log w + log N(x | μ, σ) up to −0.5 log 2π, which cancels in the responsibilities.
    const = (torch.log(weights.clamp_min(1e-30)) - torch.log(stds)).float().permute(2, 0, 1)[..., None]
    d = x - mu  # (K, C, C, S)
    log_joint = const - 0.5 * (d * inv_sd).square()
    e = torch.exp(log_joint - log_joint.amax(0, keepdim=True))
    resp = e / e.sum(0, keepdim=True) * mask[None, :, None, :].float()  # (K, C, C, S)
    rd = resp * d
    stats = torch.stack([resp.sum(-1), rd.sum(-1), (rd * d).sum(-1)])  # (3, K, C, C)
    return stats.permute(0, 2, 3, 1).to(STAT_DTYPE)  # (3, C, C, K)


def m_step(
    stats: torch.Tensor,  # (3, C, C, K)
    weights: torch.Tensor,
    means: torch.Tensor,
    stds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_k, s1, s2 = stats[0], stats[1], stats[2]
    total = n_k.sum(-1, keepdim=True)  # (C, C, 1)
    alive = n_k > 1e-8
    safe = n_k.clamp_min(1e-12)
    shift = s1 / safe
    new_means = torch.where(alive, means + shift, means)
    new_var = torch.where(alive, s2 / safe - shift**2, stds**2).clamp_min(MIN_VAR)
    new_weights = torch.where(total > 0, n_k / total.clamp_min(1e-12), weights)
    return new_weights, new_means, torch.sqrt(new_var)


def pair_momentum(state: GmmState, iteration: int, cfg: OnlineGmmConfig) -> torch.Tensor:
    """(C, C) momentum of each pair's merge: the ramped schedule, at most u / (u + 1) for a pair updated
    u times (its first estimates are averaged, not damped), at most `catchup_momentum` for a pair missed for
    `catchup_after` iterations or more."""
    ramp = min(1.0, (iteration + 1) / max(cfg.momentum_ramp_iters, 1))
    scheduled = torch.full(
        state.counts.shape, cfg.momentum * ramp, dtype=STAT_DTYPE, device=state.counts.device
    )
    updates = state.updates.to(STAT_DTYPE)
    momentum = torch.minimum(scheduled, updates / (updates + 1))
    missed = iteration - state.last_seen - 1
    stale = state.initialized & (missed >= cfg.catchup_after)
    return torch.where(stale, momentum.clamp_max(cfg.catchup_momentum), momentum)


def update_gmm(
    state: GmmState,
    logits: torch.Tensor,  # (P, C) detached student logits
    labels: torch.Tensor,  # (P,) labels / pseudo-labels, ignore_index elsewhere
    iteration: int,
    cfg: OnlineGmmConfig,
    generator: torch.Generator | None = None,
    reduce: Reduce = _identity,
    gather: Gather = _identity,
    ignore_index: int = IGNORE_INDEX,
) -> GmmState:
    """One online update; returns the new state (the input is not modified)."""
    k = cfg.components
    values, mask, class_counts = sample_pairs(
        logits.detach().float(), labels, cfg.samples_per_class, generator, ignore_index
    )
    sampled = reduce(mask.sum(-1).to(STAT_DTYPE))  # (C,)
    class_counts = reduce(class_counts)
    # Rows below the minimum count are left as they are (their few samples would drag the estimate).
    enough = (sampled > 0) & (class_counts >= cfg.min_pixels)  # (C,)
    mask = mask & enough[:, None]
    seen = enough[:, None].expand(-1, state.num_classes)  # (C, C)
    new = seen & ~state.initialized
    weights, means, stds = state.weights, state.means, state.stds
    if bool(new.any()):
        # Initialise from the quantiles of the union of all processes' samples.
        all_values = gather(values.permute(2, 0, 1).contiguous()).permute(1, 2, 0)  # (C, C, S·W)
        all_mask = gather(mask.t().contiguous()).t()  # (C, S·W)
        init = quantile_init(all_values, all_mask, k)
        sel = new[..., None]
        weights = torch.where(sel, init[0], weights)
        means = torch.where(sel, init[1], means)
        stds = torch.where(sel, init[2], stds)
    for _ in range(cfg.em_steps):
        stats = reduce(em_statistics(values, mask, weights, means, stds))
        weights, means, stds = m_step(stats, weights, means, stds)
    m = pair_momentum(state, iteration, cfg)[..., None]  # (C, C, 1)
    sel = seen[..., None]
    merged_var = m * state.stds**2 + (1 - m) * stds**2
    return GmmState(
        weights=torch.where(sel, m * state.weights + (1 - m) * weights, state.weights),
        means=torch.where(sel, m * state.means + (1 - m) * means, state.means),
        stds=torch.where(sel, torch.sqrt(merged_var), state.stds),
        counts=state.counts + class_counts[:, None].expand_as(state.counts),
        updates=state.updates + seen.long(),
        last_seen=torch.where(seen, torch.full_like(state.last_seen, iteration), state.last_seen),
    )


def gmm_cdf(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """x (*B, N), params (*B, K) -> (*B, N): Σ_k w_k Φ((x − μ_k) / σ_k)."""
    u = (x[..., :, None] - means[..., None, :]) / stds[..., None, :]
    return (weights[..., None, :] * torch.special.ndtr(u)).sum(-1)


Mixture = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pooled_anchors(state: GmmState, weighting: str = "pixels") -> tuple[Mixture, Mixture]:
    """Positive anchor (diagonal pairs) and negative anchor (off-diagonal pairs), each a mixture of
    mixtures weighted by the pairs' pixel counts ("pixels") or equally over the pairs that were seen
    ("classes"): ((w, μ, σ) of shape (C·K,), (w, μ, σ) of (C(C−1)·K,))."""
    if weighting not in ("pixels", "classes"):
        raise ValueError(f"weighting: expected 'pixels' or 'classes', got {weighting!r}")
    c = state.num_classes
    eye = torch.eye(c, dtype=torch.bool, device=state.counts.device)
    out: list[Mixture] = []
    for sel in (eye, ~eye):
        counts = state.counts[sel]  # (P,)
        if weighting == "classes":
            counts = (counts > 0).to(counts.dtype)
        if float(counts.sum()) <= 0:
            counts = torch.ones_like(counts)
        w = (state.weights[sel] * (counts / counts.sum())[:, None]).reshape(-1)
        out.append((w / w.sum(), state.means[sel].reshape(-1), state.stds[sel].reshape(-1)))
    return out[0], out[1]


@dataclass(frozen=True)
class AnchorTable:
    """Monotone tabulation of an anchor CDF, for A⁻¹ by interpolation."""

    x: torch.Tensor  # (M,) increasing knots
    p: torch.Tensor  # (M,) A(x), non-decreasing


def build_anchor_table(
    weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, num_knots: int = 1024
) -> AnchorTable:
    """Knots: a uniform grid over the support united with points placed at uniform probabilities by a
    first pass (as calibration.distributions.tabulate_cdf), so narrow components and tails both resolve."""
    live = weights > 0
    if not bool(live.any()):
        raise ValueError("anchor: expected a mixture with a positive weight, got none (no pairs pooled)")
    lo = float((means - 9 * stds)[live].min())
    hi = float((means + 9 * stds)[live].max())
    x1 = torch.linspace(lo, hi, num_knots, dtype=STAT_DTYPE, device=means.device)
    first = AnchorTable(x=x1, p=torch.cummax(gmm_cdf(x1, weights, means, stds), 0).values)
    p_grid = torch.linspace(0, 1, num_knots + 2, dtype=STAT_DTYPE, device=means.device)[1:-1]
    x = torch.sort(torch.cat([x1, inverse_anchor(p_grid, first)])).values
    p = torch.cummax(gmm_cdf(x, weights, means, stds), 0).values
    # Strictly increasing, so that flat stretches invert to a point rather than an interval.
    p = p + torch.arange(p.numel(), dtype=STAT_DTYPE, device=p.device) * 1e-15
    return AnchorTable(x=x, p=p)


def inverse_anchor(q: torch.Tensor, table: AnchorTable) -> torch.Tensor:
    """A⁻¹(q) by linear interpolation in the table; q of any shape, in (0, 1)."""
    flat = q.reshape(-1).to(STAT_DTYPE)
    idx = torch.searchsorted(table.p, flat).clamp(1, table.p.numel() - 1)
    p0, p1 = table.p[idx - 1], table.p[idx]
    x0, x1 = table.x[idx - 1], table.x[idx]
    frac = ((flat - p0) / (p1 - p0).clamp_min(1e-300)).clamp(0, 1)
    return (x0 + frac * (x1 - x0)).reshape(q.shape)


@dataclass(frozen=True)
class Anchors:
    positive: AnchorTable
    negative: AnchorTable


def build_anchors(source: GmmState, num_knots: int = 1024, weighting: str = "pixels") -> Anchors:
    pos, neg = pooled_anchors(source, weighting)
    return Anchors(build_anchor_table(*pos, num_knots), build_anchor_table(*neg, num_knots))


def shift_exact(
    z: torch.Tensor,  # (C, C, N): z at pair (c, l)
    state: GmmState,
    anchors: Anchors,
    eps: float = 0.01,
) -> torch.Tensor:
    """Δ_cl(z) for every pair at given values: A⁻¹(clip(F_cl(z), eps, 1 − eps)) − z, (C, C, N)."""
    zz = z.to(STAT_DTYPE)
    q = gmm_cdf(zz, state.weights, state.means, state.stds).clamp(eps, 1 - eps)
    c = state.num_classes
    eye = torch.eye(c, dtype=torch.bool, device=zz.device)[..., None].expand_as(zz)
    target = torch.where(eye, inverse_anchor(q, anchors.positive), inverse_anchor(q, anchors.negative))
    return target - zz


@dataclass(frozen=True)
class ShiftTable:
    """Δ_cl on a uniform knot grid per pair (same layout as calibration.alignment.ShiftTables); Δ is held
    constant beyond the grid and 0 for pairs never seen."""

    lo: torch.Tensor  # (C, C)
    step: torch.Tensor  # (C, C)
    delta: torch.Tensor  # (C, C, M) float32


def gmm_quantile(
    p: torch.Tensor,  # (*B, N) in (0, 1)
    weights: torch.Tensor,  # (*B, K)
    means: torch.Tensor,
    stds: torch.Tensor,
    iters: int = 60,
) -> torch.Tensor:
    """F⁻¹(p) of each mixture by bisection (vectorised over the batch): (*B, N)."""
    live = weights > 0
    lo = torch.where(live, means - 12 * stds, torch.full_like(means, math.inf)).amin(-1, keepdim=True)
    hi = torch.where(live, means + 12 * stds, torch.full_like(means, -math.inf)).amax(-1, keepdim=True)
    lo, hi = lo.expand_as(p).clone(), hi.expand_as(p).clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = gmm_cdf(mid, weights, means, stds) < p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def build_shift_table(
    state: GmmState, anchors: Anchors, num_knots: int = 256, eps: float = 0.01
) -> ShiftTable:
    """As calibration.alignment.build_shift_tables (margin 0): the grid of pair (c, l) spans its clamped
    quantile range [F_cl⁻¹(eps), F_cl⁻¹(1 − eps)], and Δ is held constant beyond it."""
    c = state.num_classes
    ends = gmm_quantile(
        torch.tensor([eps, 1 - eps], dtype=STAT_DTYPE, device=state.weights.device)
        .expand(c, c, 2)
        .contiguous(),
        state.weights,
        state.means,
        state.stds,
    )  # (C, C, 2)
    lo = ends[..., 0]
    span = (ends[..., 1] - lo).clamp_min(1e-6 * (num_knots - 1))
    t = torch.linspace(0, 1, num_knots, dtype=STAT_DTYPE, device=state.weights.device)
    knots = lo[..., None] + span[..., None] * t  # (C, C, M)
    delta = shift_exact(knots, state, anchors, eps)
    delta = torch.where(state.initialized[..., None], delta, torch.zeros_like(delta))
    return ShiftTable(lo=lo.float(), step=(span / (num_knots - 1)).float(), delta=delta.float())


def _slopes(delta: torch.Tensor) -> torch.Tensor:
    """(R, M) knot values -> (R, M) slope to the next knot (0 at the last): Δ(pos) = Δ[i] + frac·slope[i],
    one gather instead of two."""
    return torch.diff(delta, dim=-1, append=delta[..., -1:])


def lookup_shift(z: torch.Tensor, rows: torch.Tensor, table: ShiftTable) -> torch.Tensor:
    """Δ at values z (any shape) of pairs `rows` (same shape, flat pair index c·C + l), interpolated."""
    m = table.delta.shape[-1]
    lo = table.lo.reshape(-1)[rows]
    inv_step = (1.0 / table.step).reshape(-1)[rows]
    pos = ((z - lo) * inv_step).clamp_(0, m - 1)
    i0 = pos.to(torch.int64)  # floor: pos >= 0
    frac = pos - i0
    base = rows * m + i0
    return table.delta.reshape(-1)[base] + frac * _slopes(table.delta).reshape(-1)[base]


def stack_tables(tables: list[ShiftTable]) -> ShiftTable:
    """D tables of C×C pairs as one table of D·C "true classes" × C: table d's pair (c, l) is row d·C + c,
    so one look-up serves pixels of several domains (`shift_for_labels(..., domain=...)`)."""
    return ShiftTable(
        lo=torch.cat([t.lo for t in tables]),
        step=torch.cat([t.step for t in tables]),
        delta=torch.cat([t.delta for t in tables]),
    )


def zero_table(table: ShiftTable) -> ShiftTable:
    """The same grid with Δ = 0 everywhere: a domain that is not corrected."""
    return ShiftTable(table.lo, table.step, torch.zeros_like(table.delta))


def shift_for_labels(
    logits: torch.Tensor,  # (N, C, H, W)
    labels: torch.Tensor,  # (N, H, W); values outside [0, C) give Δ = 0
    table: ShiftTable,  # (C, C) pairs, or (D·C, C) from stack_tables with `domain`
    domain: torch.Tensor | None = None,  # (N, H, W) int in [0, D): which stacked table a pixel uses
) -> torch.Tensor:
    """Δ_{y,l}(z_l) per pixel and logit: (N, C, H, W), no gradient.

    A pixel's C grid origins and spacings are one row of the (D·C, C) tables, fetched as embedding rows
    (a row copy per pixel rather than C scattered gathers): at label resolution this look-up is the bulk of
    BLDA's per-step cost."""
    with torch.no_grad():
        c = logits.shape[1]
        m = table.delta.shape[-1]
        valid = (labels >= 0) & (labels < c)
        y = torch.where(valid, labels, torch.zeros_like(labels)).long()
        if domain is not None:
            y = y + domain.long() * c
        lo = F.embedding(y, table.lo).permute(0, 3, 1, 2)  # (N, C, H, W)
        inv_step = F.embedding(y, 1.0 / table.step).permute(0, 3, 1, 2)
        pos = ((logits.detach().float() - lo) * inv_step).clamp_(0, m - 1)
        i0 = pos.to(torch.int64)  # floor: pos >= 0
        frac = pos - i0
        base = (y[:, None] * c + torch.arange(c, device=logits.device).view(1, c, 1, 1)) * m + i0
        delta = table.delta.reshape(-1)[base] + frac * _slopes(table.delta).reshape(-1)[base]
        return torch.where(valid[:, None], delta, torch.zeros_like(delta)).to(logits.dtype)


def calibrated_scores(
    logits: torch.Tensor,  # (N, C, H, W)
    table: ShiftTable,
    tau: float,
    top_k: int = 0,
) -> torch.Tensor:
    """s_c = softmax_l(z_l + τΔ_cl(z_l))[c] per hypothesis c: (N, C, H, W), the calibrated rule's scores.
    top_k > 0 evaluates only each pixel's k highest raw classes (others score 0): k·C instead of C² look-ups
    per pixel, for pseudo-labels, where the winner is almost always among the raw top 2."""
    with torch.no_grad():
        n, c, h, w = logits.shape
        z = logits.detach().float().permute(0, 2, 3, 1).reshape(-1, c)  # (P, C)
        classes = torch.arange(c, device=logits.device)
        if top_k <= 0 or top_k >= c:
            hyp = classes.view(1, c).expand(z.shape[0], c)  # (P, H) all hypotheses
        else:
            hyp = z.topk(top_k, dim=1).indices  # (P, H)
        rows = hyp[..., None] * c + classes.view(1, 1, c)  # (P, H, C)
        zz = z[:, None, :].expand(rows.shape)
        shifted = zz + tau * lookup_shift(zz, rows, table)  # (P, H, C)
        log_s = shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)
        own = torch.gather(log_s, 2, hyp[..., None])[..., 0]  # (P, H): log s_c at l = c
        scores = torch.zeros_like(z).scatter_(1, hyp, torch.exp(own))  # (P, C)
        return scores.reshape(n, h, w, c).permute(0, 3, 1, 2)


def to_numpy_gmm(state: GmmState) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(weights, means, stds) (C, C, K) float64 and counts (C, C) int64, for calibration.distributions."""
    return (
        state.weights.detach().cpu().numpy().astype(np.float64),
        state.means.detach().cpu().numpy().astype(np.float64),
        state.stds.detach().cpu().numpy().astype(np.float64),
        np.rint(state.counts.detach().cpu().numpy()).astype(np.int64),
    )
