"""One-dimensional logit distributions: batched Gaussian mixtures, their robust fit, empirical tables.

A `Gmm` holds any batch of mixtures, e.g. (C, C, K) for the pairs (true class c, logit l) or (K,) for an
anchor. All functions are pure and vectorised over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp, ndtr

from calibration.labels import IGNORE_INDEX

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
# Below these a component is a point mass for every purpose here; the floor keeps log-pdfs finite when all
# samples are equal or a component captures one repeated value.
MIN_STD_REL = 1e-3  # relative to the spread of the samples being fitted
MIN_STD_ABS = 1e-4  # logit units
# Elements of the (rows, samples, K) responsibility array processed at once by the batched EM.
_EM_BUDGET = 2_000_000


@dataclass(frozen=True)
class Gmm:
    """A batch of 1-D Gaussian mixtures. Zero-weight components are allowed (they contribute nothing)."""

    weights: np.ndarray  # (*B, K) float64, sums to 1 over K
    means: np.ndarray  # (*B, K)
    stds: np.ndarray  # (*B, K) > 0

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.weights.shape[:-1])

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[-1])

    def __getitem__(self, index: Any) -> Gmm:
        """Index the batch dimensions, e.g. `pairs[c, l]` is the mixture of one pair."""
        return Gmm(self.weights[index], self.means[index], self.stds[index])

    def mean(self) -> np.ndarray:
        return np.sum(self.weights * self.means, axis=-1)  # (*B,)

    def std(self) -> np.ndarray:
        m = self.mean()
        second = np.sum(self.weights * (self.stds**2 + self.means**2), axis=-1)
        return np.sqrt(np.maximum(second - m**2, 0.0))  # (*B,)


def _check_gmm_x(x: np.ndarray, gmm: Gmm) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    batch = gmm.batch_shape
    if x.ndim != len(batch) + 1:
        raise ValueError(f"expected x of shape (*B, N) with B={batch}, got {x.shape}")
    return x


def gmm_cdf(x: np.ndarray, gmm: Gmm) -> np.ndarray:
    """x (*B, N) -> F(x) (*B, N); B may be () with x (N,). Monotone in x, values in [0, 1]."""
    x = _check_gmm_x(x, gmm)
    t = (x[..., :, None] - gmm.means[..., None, :]) / gmm.stds[..., None, :]  # (*B, N, K)
    cdf = np.sum(gmm.weights[..., None, :] * ndtr(t), axis=-1)
    return np.clip(cdf, 0.0, 1.0)


def gmm_logpdf(x: np.ndarray, gmm: Gmm) -> np.ndarray:
    """x (*B, N) -> log f(x) (*B, N)."""
    x = _check_gmm_x(x, gmm)
    t = (x[..., :, None] - gmm.means[..., None, :]) / gmm.stds[..., None, :]  # (*B, N, K)
    with np.errstate(divide="ignore"):
        log_w = np.log(gmm.weights)[..., None, :]
    log_comp = -0.5 * t**2 - np.log(gmm.stds)[..., None, :] - _LOG_SQRT_2PI
    return np.asarray(logsumexp(log_w + log_comp, axis=-1))


def gmm_quantile(p: np.ndarray, gmm: Gmm, iters: int = 64) -> np.ndarray:
    """p (*B, N) in (0, 1) -> F^-1(p) (*B, N) by batched bisection on the exact CDF.

    Exact to ~range / 2**iters; cost (*B, N, K) per step, so meant for small mixtures (pairs, not the
    pooled anchors: use `inverse_cdf` there).
    """
    p = _check_gmm_x(p, gmm)
    live = gmm.weights > 0
    lo_k = np.where(live, gmm.means - 12.0 * gmm.stds, np.inf).min(axis=-1)  # (*B,)
    hi_k = np.where(live, gmm.means + 12.0 * gmm.stds, -np.inf).max(axis=-1)
    lo = np.broadcast_to(lo_k[..., None], p.shape).copy()
    hi = np.broadcast_to(hi_k[..., None], p.shape).copy()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = gmm_cdf(mid, gmm) < p
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def tabulate_cdf(gmm: Gmm, num_knots: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Monotone table (x, F(x)) of one mixture (batch ()), dense both in x and in probability.

    The knots are the union of a uniform grid over the support and the points that a first pass places at
    uniform probabilities and at normal-quantile-spaced ones, so narrow components, the bulk and the tails
    are all resolved. F is made strictly increasing (ties nudged by a few ulps) so that the table inverts
    with `np.interp`. Cost: 3 * num_knots CDF evaluations of the mixture.
    """
    if gmm.batch_shape != ():
        raise ValueError(f"expected a single mixture (batch shape ()), got batch shape {gmm.batch_shape}")
    live = gmm.weights > 0
    lo = float(np.min(np.where(live, gmm.means - 9.0 * gmm.stds, np.inf)))
    hi = float(np.max(np.where(live, gmm.means + 9.0 * gmm.stds, -np.inf)))
    x1 = np.linspace(lo, hi, num_knots)
    f1 = gmm_cdf(x1, gmm)
    f1 = np.maximum.accumulate(f1)
    # Uniform probabilities for the bulk, normal-quantile spacing for the tails (the clamp sits there).
    p_grid = np.concatenate([np.linspace(0.0, 1.0, num_knots + 2)[1:-1], ndtr(np.linspace(-6, 6, num_knots))])
    keep = np.concatenate([[True], np.diff(f1) > 0])
    x2 = np.interp(p_grid, f1[keep], x1[keep])
    x = np.concatenate([x1, x2])
    order = np.argsort(x, kind="stable")
    x = x[order]
    f = np.concatenate([f1, gmm_cdf(x2, gmm)])[order]  # the first pass is reused, not recomputed
    f = np.maximum.accumulate(f)
    # Strictly increasing: flat stretches (far tails, gaps between components) become tiny slopes.
    f = f + np.arange(f.size) * 1e-15
    return x, f


def inverse_cdf(p: np.ndarray, gmm: Gmm, num_knots: int = 1024, polish: int = 2) -> np.ndarray:
    """p (N,) -> F^-1(p) (N,) for one mixture (batch ()), by monotone tabulation and interpolation, then
    `polish` safeguarded Newton steps on the exact CDF (kept inside the bracketing knots, taken only where
    they reduce |F(x) − p|): linear interpolation alone errs where a narrow component bends F between two
    knots."""
    x, f = tabulate_cdf(gmm, num_knots)
    p = np.asarray(p, dtype=np.float64)
    out = np.interp(p, f, x)
    hi_idx = np.clip(np.searchsorted(f, p), 1, f.size - 1)
    left, right = x[hi_idx - 1], x[hi_idx]
    for _ in range(polish):
        err = gmm_cdf(out, gmm) - p
        dens = np.exp(gmm_logpdf(out, gmm))
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(dens > 0, err / dens, 0.0)
        cand = np.clip(out - step, left, right)
        better = np.abs(gmm_cdf(cand, gmm) - p) < np.abs(err)
        out = np.where(better, cand, out)
    return out


def _em_weighted(
    y: np.ndarray, wt: np.ndarray, v: np.ndarray, mu: np.ndarray, floor: np.ndarray, iters: int, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched weighted EM in log space on standardised points.

    y, wt, v (B, G): point values, weights (0 = padding), within-point variances (a point summarises a
    run of sorted samples; its variance enters the M-step so the fit matches the raw samples).
    mu (B, K) initial means, floor (B, 1) minimum std. Returns weights, means, stds (B, K).
    Layout (B, K, G) keeps the long axis contiguous. Converged rows drop out of the loop.
    """
    b, k = mu.shape
    n = np.maximum(wt.sum(axis=1), 1e-300)  # (B,)
    w = np.full((b, k), 1.0 / k)
    sd = np.maximum(np.full((b, k), 1.0 / np.sqrt(k)), floor)
    yv = (y * y + v)[:, :, None]  # (B, G, 1): second moments of the points
    prev = np.full(b, -np.inf)
    active = np.flatnonzero(wt.sum(axis=1) > 0)  # rows without samples keep their initial values
    ya, wta, yva, fa, na = y[active], wt[active], yv[active], floor[active], n[active]
    for _ in range(iters):
        if active.size == 0:
            break
        wa, mua, sda = w[active], mu[active], sd[active]
        with np.errstate(divide="ignore"):
            log_c = np.log(wa) - np.log(sda)  # (A, K)
        t = (ya[:, None, :] - mua[:, :, None]) / sda[:, :, None]  # (A, K, G)
        lj = log_c[:, :, None] - 0.5 * t * t
        m = lj.max(axis=1)  # (A, G)
        e = np.exp(lj - m[:, None, :])
        ssum = e.sum(axis=1)  # (A, G)
        r = e * (wta / ssum)[:, None, :]  # (A, K, G) weighted responsibilities
        nk = r.sum(axis=2)  # (A, K)
        sy = (r @ ya[:, :, None])[:, :, 0]
        syy = (r @ yva)[:, :, 0]
        alive = nk > 1e-10 * na[:, None]
        nk_safe = np.where(alive, nk, 1.0)
        new_mu = np.where(alive, sy / nk_safe, mua)
        var = syy / nk_safe - new_mu**2
        sd[active] = np.where(alive, np.sqrt(np.maximum(var, fa**2)), sda)
        mu[active] = new_mu
        w[active] = nk / nk.sum(axis=1, keepdims=True)
        mean_ll = (np.sum(wta * (m + np.log(ssum)), axis=1) - na * _LOG_SQRT_2PI) / na
        going = np.abs(mean_ll - prev[active]) >= tol
        prev[active] = mean_ll
        if not going.all():
            active = active[going]
            ya, wta, yva, fa, na = ya[going], wta[going], yva[going], fa[going], na[going]
    return w, mu, sd


def _summarise_rows(samples: np.ndarray, mask: np.ndarray, k: int, max_points: int) -> tuple[np.ndarray, ...]:
    """Standardise each row and summarise it by at most `max_points` runs of sorted samples.

    samples, mask (B, N) -> y, wt, v (B, G) standardised run means, run sizes, run variances;
    init means (B, K) at the data quantiles; center, scale (B,); floor (B, 1); n (B,).
    Each row is standardised (median, std), so logits around +40 or with a spread of 1e-3 look the same to
    EM as logits around 0 with unit spread.
    """
    b, width = samples.shape
    n = mask.sum(axis=1)  # (B,)
    n_safe = np.maximum(n, 1)
    xs = np.sort(np.where(mask, samples, np.inf), axis=1)  # (B, N); padding last
    rows = np.arange(b)
    center = np.where(n > 0, xs[rows, np.maximum(n - 1, 0) // 2], 0.0)
    valid = np.arange(width)[None, :] < n[:, None]  # (B, N) sorted layout
    dev = np.where(valid, xs - center[:, None], 0.0)
    scale = np.maximum(np.sqrt(np.sum(dev**2, axis=1) / n_safe), MIN_STD_ABS)
    floor = np.maximum(MIN_STD_REL, MIN_STD_ABS / scale)[:, None]
    ys = dev / scale[:, None]  # (B, N)

    q_idx = np.floor((np.arange(k) + 0.5) / k * n[:, None]).astype(np.int64)
    q_idx = np.clip(q_idx, 0, np.maximum(n - 1, 0)[:, None])
    mu0 = ys[rows[:, None], q_idx]  # (B, K)

    g = max(1, min(max_points, int(n.max()) if b else 1))
    # Equal-count runs of the sorted samples; with n <= G every sample is its own run.
    gid = (np.arange(width)[None, :] * g) // n_safe[:, None]  # (B, N)
    key = np.where(valid, rows[:, None] * g + gid, b * g).reshape(-1)
    cnt = np.bincount(key, minlength=b * g + 1)[: b * g].reshape(b, g).astype(np.float64)
    s1 = np.bincount(key, weights=ys.reshape(-1), minlength=b * g + 1)[: b * g].reshape(b, g)
    s2 = np.bincount(key, weights=(ys**2).reshape(-1), minlength=b * g + 1)[: b * g].reshape(b, g)
    c_safe = np.maximum(cnt, 1.0)
    y = s1 / c_safe
    v = np.maximum(s2 / c_safe - y**2, 0.0)
    return y, cnt, v, mu0, center, scale, floor, n


def fit_gmm_batch(
    samples: np.ndarray,
    mask: np.ndarray | None = None,
    k: int = 5,
    iters: int = 100,
    tol: float = 1e-6,
    max_points: int = 512,
) -> Gmm:
    """Fit one mixture per row. samples (B, N) padded, mask (B, N) bool of real samples -> Gmm (B, K).

    Log-space EM with data-quantile initialisation on standardised rows: this is what keeps it from
    collapsing far from 0, where a linear-space EM initialised around 0 underflows. Rows with more than
    `max_points` samples are summarised by equal-count runs of their sorted samples (run mean, size and
    variance: the M-step stays exact for the runs, only responsibilities are shared within a run), which
    bounds the cost per EM step at (B, K, max_points) whatever the sample count.
    Rows without samples get a unit normal at 0 (callers give them zero count).
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2:
        raise ValueError(f"expected samples of shape (B, N), got {samples.shape}")
    if mask is None:
        mask = np.ones(samples.shape, dtype=bool)
    if mask.shape != samples.shape:
        raise ValueError(f"expected mask of shape {samples.shape}, got {mask.shape}")
    if k < 1:
        raise ValueError(f"expected k >= 1, got {k}")
    b = samples.shape[0]
    w_out = np.empty((b, k))
    m_out = np.empty((b, k))
    s_out = np.empty((b, k))
    rows_per_group = max(1, _EM_BUDGET // (k * max(1, min(max_points, samples.shape[1]))))
    for start in range(0, b, rows_per_group):
        sl = slice(start, min(b, start + rows_per_group))
        y, wt, v, mu0, center, scale, floor, n = _summarise_rows(samples[sl], mask[sl], k, max_points)
        w, mu, sd = _em_weighted(y, wt, v, mu0, floor, iters, tol)
        empty = n == 0
        w[empty], mu[empty], sd[empty] = np.eye(1, k)[0], 0.0, 1.0
        center = np.where(empty, 0.0, center)
        scale = np.where(empty, 1.0, scale)
        w_out[sl] = w
        m_out[sl] = center[:, None] + scale[:, None] * mu
        s_out[sl] = scale[:, None] * sd
    return Gmm(w_out, m_out, s_out)


def fit_gmm(samples: np.ndarray, k: int = 5, iters: int = 100, tol: float = 1e-6) -> Gmm:
    """samples (N,) -> Gmm with batch shape (): log-space EM with quantile initialisation."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"expected samples of shape (N,), got {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise ValueError("expected finite samples, got NaN or inf")
    g = fit_gmm_batch(samples[None, :], k=k, iters=iters, tol=tol)
    return g[0]


def _as_nchw(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim == 3:
        logits = logits[None]
    if labels.ndim == 2:
        labels = labels[None]
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(
            f"expected logits of shape (C, H, W) or (N, C, H, W) with C={num_classes}, got {logits.shape}"
        )
    n, _, h, w = logits.shape
    if labels.shape != (n, h, w):
        raise ValueError(f"expected labels of shape {(n, h, w)} to match the logits, got {labels.shape}")
    return logits, labels


def gather_pair_samples(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    max_samples: int = 20000,
    ignore_index: int = IGNORE_INDEX,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of the labelled pixels, per true class, subsampled.

    logits (N, C, H, W) | (C, H, W), labels (N, H, W) | (H, W) ->
    samples (C, C, S) float64 [true c, logit l, sample], mask (C, C, S) bool, counts (C, C) int64 of all
    pixels of class c (before subsampling; the same for every l).
    """
    logits, labels = _as_nchw(logits, labels, num_classes)
    _, _, h, w = logits.shape
    flat_labels = labels.reshape(-1)
    valid = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)
    pix = np.flatnonzero(valid)
    cls = flat_labels[pix].astype(np.int64)
    class_counts = np.bincount(cls, minlength=num_classes).astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in range(num_classes):
        members = pix[cls == c]
        if members.size > max_samples:
            members = np.sort(rng.choice(members, size=max_samples, replace=False))
        chosen.append(members)
    width = max(1, max(m.size for m in chosen))
    samples = np.zeros((num_classes, num_classes, width))
    mask = np.zeros((num_classes, num_classes, width), dtype=bool)
    for c, members in enumerate(chosen):
        if members.size == 0:
            continue
        img, rest = np.divmod(members, h * w)
        yy, xx = np.divmod(rest, w)
        vals = logits[img, :, yy, xx].astype(np.float64)  # (S_c, C)
        samples[c, :, : members.size] = vals.T
        mask[c, :, : members.size] = True
    counts = np.repeat(class_counts[:, None], num_classes, axis=1)
    return samples, mask, counts


def fit_pair_gmms(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    k: int = 5,
    max_samples: int = 20000,
    ignore_index: int = IGNORE_INDEX,
    seed: int = 0,
    iters: int = 100,
    tol: float = 1e-6,
) -> tuple[Gmm, np.ndarray]:
    """Mixtures of every pair (true class c, logit l) -> Gmm (C, C, K), counts (C, C) int64 of pixels seen.

    At most `max_samples` pixels per true class (uniformly subsampled with `seed`); all C*C pairs are fitted
    by one batched EM (grouped by sample count).
    """
    samples, mask, counts = gather_pair_samples(logits, labels, num_classes, max_samples, ignore_index, seed)
    if not np.all(np.isfinite(samples[mask])):
        raise ValueError("expected finite logits, got NaN or inf")
    c = num_classes
    g = fit_gmm_batch(samples.reshape(c * c, -1), mask.reshape(c * c, -1), k=k, iters=iters, tol=tol)
    shape = (c, c, k)
    return Gmm(g.weights.reshape(shape), g.means.reshape(shape), g.stds.reshape(shape)), counts


def _pool(weights: np.ndarray, pairs: Gmm, select: np.ndarray, counts: np.ndarray) -> Gmm:
    cw = np.where(select, counts, 0).astype(np.float64)  # (C, C)
    total = cw.sum()
    if total <= 0:
        # No data for this anchor: weight the selected pairs equally so the anchor is still a distribution.
        cw = select.astype(np.float64)
        total = cw.sum()
    w = (cw[..., None] / total) * weights  # (C, C, K)
    keep = w > 0
    if not keep.any():
        keep = np.zeros_like(keep)
        keep.flat[0] = True
        w = keep.astype(np.float64)
    wk = w[keep]
    return Gmm(wk / wk.sum(), pairs.means[keep], pairs.stds[keep])


def pool_mixtures(pairs: Gmm, counts: np.ndarray) -> tuple[Gmm, Gmm]:
    """Anchors from pair mixtures (C, C, K) and counts (C, C): (positive (Ka,), negative (Kn,)).

    The positive anchor pools the diagonal pairs, the negative one the off-diagonal pairs, each pair
    weighted by its pixel count: a mixture of mixtures, so it is exactly the distribution of all pooled
    logits. Zero-weight components are dropped.
    """
    c = pairs.batch_shape[0] if pairs.batch_shape else 0
    if len(pairs.batch_shape) != 2 or pairs.batch_shape[1] != c:
        raise ValueError(f"expected pair mixtures of batch shape (C, C), got {pairs.batch_shape}")
    counts = np.asarray(counts)
    if counts.shape != (c, c):
        raise ValueError(f"expected counts of shape {(c, c)}, got {counts.shape}")
    diag = np.eye(c, dtype=bool)
    return _pool(pairs.weights, pairs, diag, counts), _pool(pairs.weights, pairs, ~diag, counts)


@dataclass(frozen=True)
class Empirical:
    """A batch of empirical distributions as quantile tables (for comparison with the mixtures)."""

    levels: np.ndarray  # (Q,) increasing probabilities in [0, 1], levels[0] = 0, levels[-1] = 1
    quantiles: np.ndarray  # (*B, Q) non-decreasing values at those levels


def fit_empirical(samples: np.ndarray, mask: np.ndarray | None = None, num_quantiles: int = 257) -> Empirical:
    """samples (*B, N) [mask (*B, N)] -> Empirical (*B, Q). Rows without samples get quantiles 0."""
    samples = np.asarray(samples, dtype=np.float64)
    if mask is None:
        mask = np.ones(samples.shape, dtype=bool)
    levels = np.linspace(0.0, 1.0, num_quantiles)
    flat_x = samples.reshape(-1, samples.shape[-1])
    flat_m = mask.reshape(-1, samples.shape[-1])
    out = np.zeros((flat_x.shape[0], num_quantiles))
    for i in range(flat_x.shape[0]):
        row = flat_x[i][flat_m[i]]
        if row.size:
            out[i] = np.quantile(row, levels)
    return Empirical(levels, out.reshape(*samples.shape[:-1], num_quantiles))


def empirical_cdf(x: np.ndarray, dist: Empirical) -> np.ndarray:
    """x (*B, N) -> F(x) (*B, N), piecewise linear between the quantiles."""
    x = np.asarray(x, dtype=np.float64)
    q = dist.quantiles.reshape(-1, dist.levels.size)
    flat = x.reshape(q.shape[0], -1)
    out = np.empty_like(flat)
    for i in range(q.shape[0]):
        # Strictly increasing knots: repeated quantiles (atoms) would make np.interp ill-defined.
        knots = q[i] + np.arange(q.shape[1]) * 1e-12
        out[i] = np.interp(flat[i], knots, dist.levels)
    return out.reshape(x.shape)


def empirical_quantile(p: np.ndarray, dist: Empirical) -> np.ndarray:
    """p (*B, N) -> F^-1(p) (*B, N)."""
    p = np.asarray(p, dtype=np.float64)
    q = dist.quantiles.reshape(-1, dist.levels.size)
    flat = p.reshape(q.shape[0], -1)
    out = np.empty_like(flat)
    for i in range(q.shape[0]):
        out[i] = np.interp(flat[i], dist.levels, q[i])
    return out.reshape(p.shape)
