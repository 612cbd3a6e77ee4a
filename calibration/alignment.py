"""Shift tables Δ_cl and the calibrated decision rule (DESIGN.md §2).

Δ_cl(z) = A^-1(clip(F_cl(z), eps, 1 - eps)) - z, with A the positive anchor when c = l and the negative
anchor otherwise, is tabulated per pair on a uniform knot grid and held constant beyond it. The decision for
a pixel with logits z (C,) is argmax_c softmax_l(z_l + tau * Δ_cl(z_l))[c].
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from calibration.distributions import Gmm, gmm_cdf, gmm_quantile, tabulate_cdf

# Float32 arithmetic on logits of magnitude |z| is off by ~1e-7 |z| per step; the bound test gives this much
# slack plus 1e-6 |z| so that rounding can only add candidates, never drop the winner.
_BOUND_SLACK = 1e-3
# Elements per (hypothesis, class, pixel) work array in the exact evaluation: bounds its memory (~4 MB).
_EVAL_BUDGET = 1 << 20


@dataclass(frozen=True)
class ShiftTables:
    """Δ_cl on a uniform knot grid per pair (c, l); Δ is held constant beyond the grid."""

    lo: np.ndarray  # (C, C) float32, first knot of pair (c, l)
    step: np.ndarray  # (C, C) float32 > 0, knot spacing
    delta: np.ndarray  # (C, C, M) float32, Δ_cl at the knots

    @property
    def num_classes(self) -> int:
        return int(self.delta.shape[0])

    @property
    def num_knots(self) -> int:
        return int(self.delta.shape[2])


def build_shift_tables(
    pairs: Gmm,
    anchor_pos: Gmm,
    anchor_neg: Gmm,
    counts: np.ndarray | None = None,
    num_knots: int = 256,
    eps: float = 0.01,
    margin: float = 0.0,
    anchor_knots: int = 4096,
) -> ShiftTables:
    """Tabulate Δ_cl for pair mixtures (C, C, K) against the anchors; pairs with count 0 get Δ = 0.

    The grid of pair (c, l) spans its clamped quantile range [F_cl^-1(eps), F_cl^-1(1 - eps)], widened on
    each side by `margin` times its width. With margin 0 (the default) the constant extension beyond the
    grid is a translation by the edge shift, so z + Δ(z) stays increasing and Δ is exactly 0 everywhere
    when F_cl equals its anchor; a margin > 0 pins z + Δ(z) to the anchor's clamp quantile over the margin
    (the reference code's behaviour there) before the constant extension.
    """
    if len(pairs.batch_shape) != 2 or pairs.batch_shape[0] != pairs.batch_shape[1]:
        raise ValueError(f"expected pair mixtures of batch shape (C, C), got {pairs.batch_shape}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"expected eps in (0, 0.5), got {eps}")
    if num_knots < 2:
        raise ValueError(f"expected num_knots >= 2, got {num_knots}")
    c = pairs.batch_shape[0]
    if counts is None:
        counts = np.ones((c, c), dtype=np.int64)
    counts = np.asarray(counts)
    if counts.shape != (c, c):
        raise ValueError(f"expected counts of shape {(c, c)}, got {counts.shape}")

    ends = gmm_quantile(np.broadcast_to(np.array([eps, 1.0 - eps]), (c, c, 2)), pairs)  # (C, C, 2)
    width = ends[..., 1] - ends[..., 0]
    lo = ends[..., 0] - margin * width
    hi = ends[..., 1] + margin * width
    step = np.maximum((hi - lo) / (num_knots - 1), 1e-6)  # (C, C)
    z = lo[..., None] + step[..., None] * np.arange(num_knots)  # (C, C, M)
    q = np.clip(gmm_cdf(z, pairs), eps, 1.0 - eps)

    xp, fp = tabulate_cdf(anchor_pos, anchor_knots)
    xn, fn = tabulate_cdf(anchor_neg, anchor_knots)
    diag = np.eye(c, dtype=bool)
    mapped = np.empty_like(q)
    mapped[diag] = np.interp(q[diag], fp, xp)
    mapped[~diag] = np.interp(q[~diag], fn, xn)
    delta = mapped - z
    empty = counts <= 0
    delta[empty] = 0.0
    lo[empty] = 0.0
    step[empty] = 1.0
    return ShiftTables(lo.astype(np.float32), step.astype(np.float32), delta.astype(np.float32))


@dataclass(frozen=True)
class _Prepared:
    """Tables laid out for index arithmetic, and the per-hypothesis bounds of the exact skip test."""

    lo: np.ndarray  # (C, C) float32, first knot
    inv_step: np.ndarray  # (C, C) float32
    base: np.ndarray  # (C, C) int32, offset (c*C + l)*M of pair (c, l) in `knots`
    knots: np.ndarray  # (C*C*M, 2) float32: Δ at knot i and Δ(knot i+1) - Δ(knot i) (0 at the last)
    m: int
    up: np.ndarray  # (C, 1) float32, U_c = max τΔ_cc - min_{l≠c} τΔ_cl
    low: np.ndarray  # (C, 1) float32, V_c = min τΔ_cc - max_{l≠c} τΔ_cl
    exp_lo: np.ndarray  # (C, C) refine_dtype, exp(min τΔ_cl), 0 on the diagonal
    exp_hi: np.ndarray  # (C, C) refine_dtype, exp(max τΔ_cl), 0 on the diagonal
    tau: float
    refine_dtype: type | None  # float type of the second pass; None where τΔ is too large for exp


_PREPARED: dict[tuple[int, float], tuple[weakref.ref[ShiftTables], _Prepared]] = {}
_PREPARED_LOCK = threading.Lock()  # servers call the rule from several threads


def _prepare(tables: ShiftTables, tau: float) -> _Prepared:
    """_Prepared for (tables, tau), cached for the few most recent pairs (a server reuses one table).

    Tables are treated as immutable: arrays changed in place after a first call are not seen.
    """
    key = (id(tables), float(tau))
    with _PREPARED_LOCK:
        hit = _PREPARED.get(key)
    # The weak reference tells a live table from a new one that reuses a dead one's id.
    if hit is not None and hit[0]() is tables:
        return hit[1]
    prep = _prepare_uncached(tables, tau)
    with _PREPARED_LOCK:
        while len(_PREPARED) >= 8:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = (weakref.ref(tables), prep)
    return prep


def _prepare_uncached(tables: ShiftTables, tau: float) -> _Prepared:
    c, _, m = tables.delta.shape
    delta = tables.delta.astype(np.float32)
    slope = np.zeros_like(delta)
    slope[..., :-1] = np.diff(delta, axis=-1)
    scaled = float(tau) * delta.astype(np.float64)
    # The constant extension keeps Δ_cl inside [min over its knots, max over its knots] for every z, and
    # linear interpolation stays between neighbouring knots, so these ranges hold for all inputs.
    hi = scaled.max(axis=-1)  # (C, C)
    lo = scaled.min(axis=-1)
    off = ~np.eye(c, dtype=bool)
    n_hi = np.where(off, hi, -np.inf).max(axis=1) if c > 1 else np.zeros(c)
    n_lo = np.where(off, lo, np.inf).min(axis=1) if c > 1 else np.zeros(c)
    d_hi, d_lo = np.diag(hi), np.diag(lo)
    # The second pass exponentiates logit gaps of candidates (at most 4 max|τΔ| after the first pass) and
    # τΔ itself: float32 is exact enough and cannot under/overflow while max|τΔ| < 10, float64 below 150.
    big = float(np.abs(scaled).max(initial=0.0))
    refine_dtype = np.float32 if big < 10.0 else np.float64 if big < 150.0 else None
    with np.errstate(over="ignore"):
        exp_lo = np.where(off, np.exp(np.minimum(lo, 300.0)), 0.0)
        exp_hi = np.where(off, np.exp(np.minimum(hi, 300.0)), 0.0)
    if refine_dtype is not None:
        exp_lo, exp_hi = exp_lo.astype(refine_dtype), exp_hi.astype(refine_dtype)
    return _Prepared(
        lo=tables.lo.astype(np.float32),
        inv_step=(1.0 / tables.step.astype(np.float64)).astype(np.float32),
        base=(np.arange(c * c, dtype=np.int32) * m).reshape(c, c),
        knots=np.stack([delta.reshape(-1), slope.reshape(-1)], axis=-1),
        m=m,
        up=(d_hi - n_lo).astype(np.float32)[:, None],
        low=(d_lo - n_hi).astype(np.float32)[:, None],
        exp_lo=exp_lo,
        exp_hi=exp_hi,
        tau=float(tau),
        refine_dtype=refine_dtype,
    )


def _lookup_rows(z: np.ndarray, hyp: np.ndarray, prep: _Prepared) -> np.ndarray:
    """Δ_{h,l}(z_l) for rows of logits. z (Q, C) float32, hyp (Q,) -> (Q, C) float32.

    Index arithmetic on the uniform grid: whole rows of the per-hypothesis parameters are gathered at once
    and each value costs one gather of (Δ_i, Δ_{i+1} - Δ_i).
    """
    t = z - prep.lo[hyp]
    t *= prep.inv_step[hyp]
    np.clip(t, 0.0, prep.m - 1, out=t)  # constant beyond the grid
    i = t.astype(np.int32)  # floor, since t >= 0
    np.minimum(i, prep.m - 2, out=i)
    t -= i
    i += prep.base[hyp]
    d = np.take(prep.knots, i, axis=0)  # (Q, C, 2)
    t *= d[..., 1]
    t += d[..., 0]
    return t


def shift_values(z: np.ndarray, tables: ShiftTables) -> np.ndarray:
    """z (C, P) logits -> Δ (C_hyp, C, P): Δ_cl(z_l) for every hypothesis c."""
    c = tables.num_classes
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[0] != c:
        raise ValueError(f"expected z of shape (C, P) with C={c}, got {z.shape}")
    prep = _prepare(tables, 0.0)
    p = z.shape[1]
    rows = np.broadcast_to(z.T[None], (c, p, c)).reshape(c * p, c)  # (C_hyp * P, C)
    hyp = np.repeat(np.arange(c), p)
    return _lookup_rows(np.ascontiguousarray(rows), hyp, prep).reshape(c, p, c).transpose(0, 2, 1)


def _hyp_scores(zt: np.ndarray, hyp: np.ndarray, pix: np.ndarray, prep: _Prepared, tau: float) -> np.ndarray:
    """g_c for (hypothesis, pixel) couples. zt (P, C) pixel-major; hyp, pix (Q,) -> (Q,) float32.

    g_c = z_c + τΔ_cc(z_c) - logsumexp_{l≠c}(z_l + τΔ_cl(z_l)), the log-odds of s_c: same argmax as s_c,
    but it does not saturate where s_c rounds to 1 (log s_c = -log(1 + exp(-g_c)) is 0 in float32 for
    g_c > 17, which would turn clear winners into ties).
    """
    c = zt.shape[1]
    out = np.empty(hyp.shape[0], dtype=np.float32)
    if c == 1:
        out[:] = np.inf  # a single class always wins
        return out
    rows = max(1, _EVAL_BUDGET // c)
    tau32 = np.float32(tau)
    for s in range(0, hyp.shape[0], rows):
        h = hyp[s : s + rows]
        zq = zt[pix[s : s + rows]]  # (q, C)
        shifted = _lookup_rows(zq, h, prep)
        shifted *= tau32
        shifted += zq
        diag = np.arange(h.shape[0]) * c + h  # flat indices: 4x faster than [rows, h]
        own = np.take(shifted, diag)
        np.put(shifted, diag, -np.inf)  # the others' logsumexp
        top = shifted.max(axis=1, keepdims=True)
        shifted -= top
        np.exp(shifted, out=shifted)
        out[s : s + rows] = own - top[:, 0] - np.log(shifted.sum(axis=1))
    return out


def _decide_by_scores(z: np.ndarray, cand: np.ndarray, prep: _Prepared, tau: float) -> np.ndarray:
    """z (C, P), cand (C, P) bool hypotheses to evaluate -> (P,) argmax over the candidates.

    Ties go to the lowest class index, as in np.argmax over all hypotheses.
    """
    flat = np.flatnonzero(cand)  # flat indices: much faster than np.nonzero on 2-D masks
    hyp, pix = np.divmod(flat, cand.shape[1])
    scores = np.full(cand.shape, -np.inf, dtype=np.float32)
    scores.reshape(-1)[flat] = _hyp_scores(np.ascontiguousarray(z.T), hyp, pix, prep, tau)
    return scores.argmax(axis=0)


def _argmax0(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(np.argmax(z, axis=0), np.max(z, axis=0)) for (C, P), first index on ties, ~4x faster than
    np.argmax, which copies along a non-contiguous axis where max and min reductions do not. Rows of NaN
    give class 0."""
    c = z.shape[0]
    m = z.max(axis=0)
    idx = np.arange(c, dtype=np.int8 if c < 127 else np.int32)[:, None]
    first = np.where(z == m, idx, idx.dtype.type(c)).min(axis=0)
    first[first == c] = 0
    return first.astype(np.int64), m


def _first_pass(z: np.ndarray, prep: _Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First pass of the exact bound of `calibrated_decision` (class-wide ranges, no exp).

    z (C, P) -> raw top class (P,), ambiguous pixel indices (H,), their candidates (C, H) bool. A pixel
    is ambiguous when some c ≠ t has z_c + U_c >= z_t + V_t; only those pixels build a (C, .) mask.
    """
    top, zmax = _argmax0(z)  # (P,), (P,)
    p = z.shape[1]
    # (P,) lower bound of g_t up to R_t, less a slack that covers float32 rounding at this magnitude
    best = zmax + prep.low[top, 0] - (_BOUND_SLACK + 1e-6 * np.abs(zmax))
    w = z + prep.up  # (C, P) upper bounds of g_c, up to R_c
    np.put(w, top * p + np.arange(p), -np.inf)  # flat C-order indices, whatever the memory layout
    hard = np.flatnonzero(w.max(axis=0) >= best)
    cand = w[:, hard] >= best[hard]
    np.put(cand, top[hard] * hard.size + np.arange(hard.size), True)
    return top, hard, cand


def _matmul_columns(m: np.ndarray, x: np.ndarray, block: int = 512) -> np.ndarray:
    """m (C, C) @ x (C, P) in column blocks small enough that OpenBLAS stays on one thread: on a busy
    machine its threads turn this 0.1 ms product into tens of milliseconds."""
    out = np.empty((m.shape[0], x.shape[1]), dtype=np.result_type(m, x))
    for s in range(0, x.shape[1], block):
        np.matmul(m, x[:, s : s + block], out=out[:, s : s + block])
    return out


def _lookup_pairs(z: np.ndarray, pair: np.ndarray, prep: _Prepared) -> np.ndarray:
    """Δ of pair index pair (= c*C + l) at logits z, both (Q,): the arithmetic of `_lookup_rows`."""
    t = z - prep.lo.reshape(-1)[pair]
    t *= prep.inv_step.reshape(-1)[pair]
    np.clip(t, 0.0, prep.m - 1, out=t)
    i = t.astype(np.int32)
    np.minimum(i, prep.m - 2, out=i)
    t -= i
    i += prep.base.reshape(-1)[pair]
    d = np.take(prep.knots, i, axis=0)  # (Q, 2)
    t *= d[:, 1]
    t += d[:, 0]
    return t


def first_pass_margins(
    z: np.ndarray, tables: ShiftTables, tau: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z (C, P) -> raw top class t (P,), raw margin z_t - max_{c≠t} z_c (P,) and the first-pass margin
    (z_t + V_t) - max_{c≠t} (z_c + U_c) (P,) of the exact bound (see `calibrated_decision`).

    A pixel whose first-pass margin exceeds `bound_slack(z_t)` keeps its raw decision under the calibrated
    rule. For a fixed t both margins are minima of functions linear in z, so where they hold with the same
    t at several logit vectors they hold at every convex combination of them: at every bilinearly
    interpolated pixel between logit-grid pixels (calibration.segmentation uses this to skip upsampling).
    """
    prep = _prepare(tables, tau)
    top, zmax = _argmax0(z)
    p = z.shape[1]
    flat = top * p + np.arange(p)
    others = z.copy()
    np.put(others, flat, -np.inf)
    raw_margin = zmax - others.max(axis=0)
    others += prep.up
    np.put(others, flat, -np.inf)
    cal_margin = zmax + prep.low[top, 0] - others.max(axis=0)
    return top, raw_margin, cal_margin


def bound_slack(z: np.ndarray) -> np.ndarray:
    """The float slack of the first pass at logits of magnitude |z|: margins above it are safe."""
    return _BOUND_SLACK + 1e-6 * np.abs(z)


def _refine(z: np.ndarray, top: np.ndarray, cand: np.ndarray, prep: _Prepared) -> np.ndarray:
    """Second pass of the bound on ambiguous pixels: exact diagonal shifts, per-pair ranges elsewhere.

    z (C, P), top (P,), cand (C, P) -> cand (C, P), never empty. With L_cl / H_cl the min / max of τΔ_cl
    over its knots and a_c = z_c + τΔ_cc(z_c) computed exactly (one look-up per candidate),
        a_c - logsumexp_{l≠c}(z_l + H_cl)  <=  g_c  <=  a_c - logsumexp_{l≠c}(z_l + L_cl),
    and c can only win if its upper bound reaches the best lower bound of the candidates. With
    e = exp(z - z_t) the sums are matrix products A = exp(L) @ e and B = exp(H) @ e (zero diagonals), so
    in exp(· - z_t) units the bounds are e_c exp(τΔ_cc) / B_c and e_c exp(τΔ_cc) / A_c: no logarithms.
    A_c <= B_c, so each candidate's upper bound is at least its lower bound and the best stays.
    """
    if prep.refine_dtype is None:
        return cand
    c, p = z.shape
    zt = np.take(z, top * p + np.arange(p))  # (P,) the raw top logits
    dtype = prep.refine_dtype
    if dtype is np.float32 and p and np.abs(zt).max() > 1e3:
        dtype = np.float64  # float32 differences of large logits would eat the slack
    e: np.ndarray = z.astype(dtype) - zt.astype(dtype)
    np.exp(e, out=e)  # (C, P) in (0, 1]; what underflows is far below the candidates (see _prepare)
    a = _matmul_columns(prep.exp_lo.astype(dtype, copy=False), e)  # (C, P)
    b = _matmul_columns(prep.exp_hi.astype(dtype, copy=False), e)
    flat = np.flatnonzero(cand)  # (Q,) flat indices into (C, P): much faster than 2-D fancy indexing
    hyp = flat // p
    diag: np.ndarray = _lookup_pairs(np.take(z, flat), hyp * (c + 1), prep).astype(dtype)
    own = np.take(e, flat) * np.exp(np.asarray(prep.tau, dtype=dtype) * diag)  # exp(a_c - z_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = own / np.take(a, flat)  # inf where all other logits underflowed: c = t, certain
        lower = own / np.take(b, flat)
    best = np.zeros(c * p, dtype=dtype)
    best[flat] = lower
    best_low = best.reshape(c, p).max(axis=0)  # (P,)
    # The same slack as the first pass, in exp units: float32 scores of large logits round by ~1e-7 |z|.
    slack = np.exp(-(_BOUND_SLACK + 1e-6 * np.abs(zt.astype(np.float64)))).astype(dtype)  # (P,)
    keep = upper >= np.take(best_low * slack, flat - hyp * p)
    refined = np.zeros(c * p, dtype=bool)
    refined[flat[keep]] = True
    return refined.reshape(c, p)


def _kth_largest(z: np.ndarray, k: int) -> np.ndarray:
    """z (C, P) -> (P,) the k-th largest value of each column (ties counted once: z >= it holds the k
    largest, and any value tied with them). Repeated maxima for small k, a partition otherwise."""
    if k > 4:
        return np.partition(z, z.shape[0] - k, axis=0)[z.shape[0] - k]
    w = z.copy()
    for _ in range(k - 1):
        m = w.max(axis=0)
        w[w >= m] = -np.inf
    return w.max(axis=0)


def _bound(z: np.ndarray, prep: _Prepared, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both passes of the bound. z (C, P) -> decision where settled (P,), still ambiguous pixels (H,) and
    their candidates (C, H). With k, only the k largest raw logits of each pixel are hypotheses."""
    top, hard, cand = _first_pass(z, prep)
    if hard.size == 0:
        return top, hard, cand
    zh = z.take(hard, axis=1)  # (C, H) C-ordered, unlike z[:, hard]: flat takes on it stay cheap
    if k is not None and k < z.shape[0]:
        # The raw top class is always tried, so the first pass (which compares with it) stays sound.
        cand &= zh >= _kth_largest(zh, k)
    ch = _refine(zh, top[hard], cand, prep)
    count = ch.sum(axis=0)
    single = count == 1
    top[hard[single]] = ch[:, single].argmax(axis=0)  # settled by the bound, maybe not the raw top
    multi = ~single
    return top, hard[multi], ch[:, multi]


def _check_logits(logits: np.ndarray, c: int) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim not in (3, 4) or logits.shape[-3] != c:
        raise ValueError(f"expected logits of shape (C, H, W) or (N, C, H, W) with C={c}, got {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"expected floating-point logits, got dtype {logits.dtype}")
    return logits


def _chunked(logits: np.ndarray, chunk_pixels: int, decide: object) -> np.ndarray:
    """Apply decide((C, P) float32) -> (P,) over pixel chunks of (C, H, W) / (N, C, H, W) logits."""
    single = logits.ndim == 3
    batch = logits[None] if single else logits
    n, c, h, w = batch.shape
    out = np.empty((n, h * w), dtype=np.int64)
    chunk = max(1, int(chunk_pixels))
    for i in range(n):
        flat = batch[i].reshape(c, h * w)  # a view for contiguous inputs
        for s in range(0, h * w, chunk):
            z = np.ascontiguousarray(flat[:, s : s + chunk], dtype=np.float32)
            out[i, s : s + chunk] = decide(z)  # type: ignore[operator]
    out = out.reshape(n, h, w)
    return out[0] if single else out


def calibrated_decision(
    logits: np.ndarray,
    tables: ShiftTables,
    tau: float = 0.2,
    chunk_pixels: int = 16384,
    use_bound: bool = True,
) -> np.ndarray:
    """Exact calibrated rule argmax_c softmax_l(z_l + τΔ_cl(z_l))[c].

    (C, H, W) -> (H, W), (N, C, H, W) -> (N, H, W) int64. Pixels are processed in chunks, so extra memory
    is bounded by the chunk size, not the image. With `use_bound` (the default) most pixels are decided
    by the exact bound below and only the remaining (pixel, hypothesis) couples are evaluated; without it
    every hypothesis of every pixel is evaluated (the reference for the fast path; same result).

    Why the bound is exact. Write a_c = z_c + τΔ_cc(z_c) and b_cl = z_l + τΔ_cl(z_l). Then
        log s_c = a_c - logsumexp(a_c, {b_cl}_{l≠c}) = -log(1 + exp(-g_c)),
        g_c = a_c - logsumexp_{l≠c} b_cl,
    so argmax_c s_c = argmax_c g_c (log s_c is increasing in g_c). Every table value of pair (c, l) lies in
    [min, max] of its knots (linear interpolation between knots, constant beyond), so with
    d_hi/d_lo the extremes of τΔ_cc and n_hi/n_lo those of τΔ_cl over l ≠ c,
        z_c + d_lo - n_hi - R_c  <=  g_c  <=  z_c + d_hi - n_lo - R_c,    R_c = logsumexp_{l≠c} z_l
    (shifting every term of a logsumexp by at most x moves it by at most x). Let t be the raw top class.
    For c ≠ t, R_t <= R_c (the two sums differ only by z_c in R_t standing for z_t in R_c, and z_c <= z_t),
    so g_c - g_t <= (z_c + U_c) - (z_t + V_t) with U_c = d_hi_c - n_lo_c and V_t = d_lo_t - n_hi_t:
    hypothesis c ≠ t can only beat t if z_c + U_c >= z_t + V_t (first pass: no exp, all pixels).
    Pixels with other candidates get a second pass (see `_refine`) that brackets each candidate's g_c
    directly, with its diagonal shift looked up exactly and per-pair ranges L_cl <= τΔ_cl <= H_cl:
        a_c - logsumexp_{l≠c}(z_l + H_cl)  <=  g_c  <=  a_c - logsumexp_{l≠c}(z_l + L_cl),
    and drops every candidate whose upper end is below another's lower end. A pixel left with one
    candidate gets it, exactly; the others evaluate their candidates exactly. The bound only decides which
    couples to evaluate, never a value, and a small float slack only adds candidates. On realistic logits
    the two passes settle ~98% of the pixels (see `python -m bench calibration`).
    """
    c = tables.num_classes
    logits = _check_logits(logits, c)
    prep = _prepare(tables, tau)

    def full(z: np.ndarray) -> np.ndarray:
        return _decide_by_scores(z, np.ones(z.shape, dtype=bool), prep, tau)

    def bounded(z: np.ndarray) -> np.ndarray:
        top, hard, cand = _bound(z, prep)
        if hard.size:
            top[hard] = _decide_by_scores(z.take(hard, axis=1), cand, prep, tau)
        return top

    return _chunked(logits, chunk_pixels, bounded if use_bound else full)


def candidate_counts(logits: np.ndarray, tables: ShiftTables, tau: float = 0.2) -> np.ndarray:
    """Hypotheses the exact rule evaluates per pixel (1: decided by the bound alone).

    (C, H, W) -> (H, W), (N, C, H, W) -> (N, H, W) int64. For benchmarks and monitoring of the fast path.
    """
    c = tables.num_classes
    logits = _check_logits(logits, c)
    prep = _prepare(tables, tau)

    def count(z: np.ndarray) -> np.ndarray:
        _, hard, cand = _bound(z, prep)
        out = np.ones(z.shape[1], dtype=np.int64)
        out[hard] = cand.sum(axis=0)
        return out

    return _chunked(logits, 16384, count)


def calibrated_decision_topk(
    logits: np.ndarray, tables: ShiftTables, tau: float = 0.2, k: int = 2, chunk_pixels: int = 16384
) -> np.ndarray:
    """Approximate rule: only the k largest raw logits of each pixel are tried as hypotheses.

    Each tried hypothesis is scored exactly (softmax over all C classes); equals the exact rule for k = C
    (logits tied with the k-th largest are tried too). The exact bound prunes among the tried ones, so
    with it this is rarely faster than the exact rule: a fallback, whose agreement with the exact rule
    `python -m bench calibration` reports.
    (C, H, W) -> (H, W), (N, C, H, W) -> (N, H, W) int64.
    """
    c = tables.num_classes
    logits = _check_logits(logits, c)
    if not 1 <= k <= c:
        raise ValueError(f"expected k in [1, {c}], got {k}")
    prep = _prepare(tables, tau)

    def decide(z: np.ndarray) -> np.ndarray:
        if k == 1:
            return _argmax0(z)[0]
        # The exact bound prunes here too, among the k tried hypotheses.
        top, hard, cand = _bound(z, prep, k)
        if hard.size:
            top[hard] = _decide_by_scores(z.take(hard, axis=1), cand, prep, tau)
        return top

    return _chunked(logits, chunk_pixels, decide)


def raw_decision(logits: np.ndarray) -> np.ndarray:
    """argmax over classes: (C, H, W) -> (H, W), (N, C, H, W) -> (N, H, W) int64."""
    logits = np.asarray(logits)
    if logits.ndim not in (3, 4):
        raise ValueError(f"expected logits of shape (C, H, W) or (N, C, H, W), got {logits.shape}")
    return logits.argmax(axis=-3)
