"""Shift tables and the calibrated rule against a slow, obviously-correct reference loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.alignment import (
    ShiftTables,
    build_shift_tables,
    calibrated_decision,
    calibrated_decision_topk,
    shift_values,
)
from calibration.distributions import Gmm, gmm_cdf, gmm_quantile, inverse_cdf, pool_mixtures
from calibration.tables import build_calibration_tables


def reference_delta(tables: ShiftTables, c: int, j: int, z: float) -> float:
    """Δ_cl(z): np.interp on the knot grid; np.interp holds the end values beyond it."""
    m = tables.delta.shape[2]
    knots = tables.lo[c, j].astype(np.float64) + tables.step[c, j].astype(np.float64) * np.arange(m)
    return float(np.interp(z, knots, tables.delta[c, j].astype(np.float64)))


def reference_scores(z: np.ndarray, tables: ShiftTables, tau: float) -> np.ndarray:
    """z (C,) -> s (C,): s_c = softmax_l(z_l + tau * Δ_cl(z_l))[c], one hypothesis at a time."""
    num = len(z)
    s = np.empty(num)
    for c in range(num):
        shifted = np.array([z[j] + tau * reference_delta(tables, c, j, z[j]) for j in range(num)])
        e = np.exp(shifted - shifted.max())
        s[c] = e[c] / e.sum()
    return s


def reference_decision(logits: np.ndarray, tables: ShiftTables, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) -> decision (H, W), and the log-ratio of the two best scores (to spot near-ties)."""
    _, h, w = logits.shape
    out = np.empty((h, w), dtype=np.int64)
    gap = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            s = reference_scores(logits[:, i, j].astype(np.float64), tables, tau)
            out[i, j] = int(np.argmax(s))
            top2 = np.sort(s)[-2:]
            gap[i, j] = np.log(top2[1]) - np.log(top2[0])
    return out, gap


def random_tables(rng: np.random.Generator, c: int, m: int = 16, scale: float = 2.0) -> ShiftTables:
    """Arbitrary (non-monotone, class-biased) tables: the rule must be exact for any table."""
    lo = rng.normal(0, 3, (c, c)).astype(np.float32)
    step = rng.uniform(0.05, 1.0, (c, c)).astype(np.float32)
    delta = (np.cumsum(rng.normal(0, 0.3, (c, c, m)), axis=-1) + rng.normal(0, scale, (c, c, 1))).astype(
        np.float32
    )
    return ShiftTables(lo, step, delta)


def random_logits(rng: np.random.Generator, c: int, h: int, w: int, spread: float) -> np.ndarray:
    """Class-biased logits with a mix of confident and ambiguous pixels."""
    top = rng.integers(0, c, (h, w))
    z = rng.normal(0, spread, (c, h, w)) + rng.uniform(0, 6, (h, w)) * np.eye(c)[top].transpose(2, 0, 1)
    return z.astype(np.float32)


def assert_same_decision(got: np.ndarray, ref: np.ndarray, gap: np.ndarray) -> None:
    """Equal everywhere except at float32 near-ties of the reference's two best hypotheses."""
    differ = got != ref
    assert np.all(gap[differ] < 1e-4), f"{differ.sum()} pixels differ, gaps {gap[differ]}"


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tau=st.floats(0.0, 2.0),
    c=st.sampled_from([2, 3, 7, 19]),
    spread=st.floats(0.1, 5.0),
)
def test_vectorised_rule_equals_reference_loop(seed: int, tau: float, c: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    tables = random_tables(rng, c)
    logits = random_logits(rng, c, 5, 6, spread)
    ref, gap = reference_decision(logits, tables, tau)
    for use_bound in (True, False):
        got = calibrated_decision(logits, tables, tau=tau, use_bound=use_bound, chunk_pixels=7)
        assert got.shape == (5, 6) and got.dtype == np.int64
        assert_same_decision(got, ref, gap)
    assert_same_decision(calibrated_decision_topk(logits, tables, tau=tau, k=c), ref, gap)


def test_shift_values_equal_reference_interpolation_with_constant_extension() -> None:
    rng = np.random.default_rng(1)
    c = 4
    tables = random_tables(rng, c)
    z = rng.normal(0, 8, (c, 50)).astype(np.float32)  # well beyond many grids on both sides
    d = shift_values(z, tables)
    assert d.shape == (c, c, 50)
    ref = np.array(
        [[[reference_delta(tables, a, b, z[b, p]) for p in range(50)] for b in range(c)] for a in range(c)]
    )
    np.testing.assert_allclose(d, ref, atol=1e-5)


def near_constant_tables(rng: np.random.Generator, c: int, m: int = 8) -> ShiftTables:
    """Per-pair offsets plus a little noise: the bound is nearly tight, decisions flip right at its edge."""
    lo = rng.normal(0, 3, (c, c)).astype(np.float32)
    step = rng.uniform(0.05, 1.0, (c, c)).astype(np.float32)
    offsets = rng.normal(0, 2, (c, c, 1)) * np.eye(c)[:, :, None] + rng.normal(0, 0.2, (c, c, 1))
    delta = (offsets + rng.normal(0, 0.01, (c, c, m))).astype(np.float32)
    return ShiftTables(lo, step, delta)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tau=st.floats(0.0, 3.0),
    spread=st.floats(0.05, 8.0),
    near_constant=st.booleans(),
    offset=st.sampled_from([0.0, 0.0, 40.0, -3e4]),
)
def test_bound_fast_path_equals_full_evaluation(
    seed: int, tau: float, spread: float, near_constant: bool, offset: float
) -> None:
    rng = np.random.default_rng(seed)
    c = 19
    if near_constant:
        tables = near_constant_tables(rng, c)
    else:
        tables = random_tables(rng, c, m=32, scale=rng.uniform(0.1, 3.0))
    logits = random_logits(rng, c, 24, 32, spread) + np.float32(offset)  # far from 0: rounding grows
    fast = calibrated_decision(logits, tables, tau=tau, chunk_pixels=100)
    full = calibrated_decision(logits, tables, tau=tau, use_bound=False)
    np.testing.assert_array_equal(fast, full)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.0, 1.0))
def test_topk_with_k_equal_c_is_the_full_rule_and_k1_is_argmax(seed: int, tau: float) -> None:
    rng = np.random.default_rng(seed)
    c = 7
    tables = random_tables(rng, c)
    logits = random_logits(rng, c, 10, 12, 2.0)
    full = calibrated_decision(logits, tables, tau=tau, use_bound=False)
    np.testing.assert_array_equal(calibrated_decision_topk(logits, tables, tau=tau, k=c), full)
    np.testing.assert_array_equal(calibrated_decision_topk(logits, tables, tau=tau, k=1), logits.argmax(0))
    k3 = calibrated_decision_topk(logits, tables, tau=tau, k=3)
    # A top-3 decision is always one of the three largest raw logits.
    rank = (logits > np.take_along_axis(logits, k3[None], axis=0)).sum(axis=0)
    assert np.all(rank < 3)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.0, 2.0), k=st.integers(2, 6), near_constant=st.booleans())
def test_topk_equals_reference_restricted_to_the_k_largest_logits(
    seed: int, tau: float, k: int, near_constant: bool
) -> None:
    rng = np.random.default_rng(seed)
    c = 7
    tables = near_constant_tables(rng, c) if near_constant else random_tables(rng, c)
    logits = random_logits(rng, c, 6, 7, 1.0)
    got = calibrated_decision_topk(logits, tables, tau=tau, k=k)
    for i in range(6):
        for j in range(7):
            z = logits[:, i, j].astype(np.float64)
            tried = np.argsort(-z, kind="stable")[:k]
            s = reference_scores(z, tables, tau)
            best = tried[np.argmax(s[tried])]
            if got[i, j] != best:
                # Only at float32 near-ties of the two best tried hypotheses.
                assert abs(np.log(s[got[i, j]]) - np.log(s[best])) < 1e-4
                assert got[i, j] in tried


def test_batched_and_chunked_inputs_give_the_same_decisions() -> None:
    rng = np.random.default_rng(2)
    c = 5
    tables = random_tables(rng, c)
    logits = np.stack([random_logits(rng, c, 9, 11, 2.0) for _ in range(3)])  # (N, C, H, W)
    batched = calibrated_decision(logits, tables, chunk_pixels=13)
    assert batched.shape == (3, 9, 11)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], calibrated_decision(logits[i], tables, chunk_pixels=10_000))
    np.testing.assert_array_equal(
        calibrated_decision(logits.astype(np.float64), tables), calibrated_decision(logits, tables)
    )


def test_shapes_are_validated() -> None:
    tables = random_tables(np.random.default_rng(0), 19)
    with pytest.raises(
        ValueError,
        match=r"expected logits of shape \(C, H, W\) or \(N, C, H, W\) with C=19, got \(18, 4, 4\)",
    ):
        calibrated_decision(np.zeros((18, 4, 4), np.float32), tables)
    with pytest.raises(ValueError, match="expected logits of shape"):
        calibrated_decision_topk(np.zeros((4, 4), np.float32), tables)
    with pytest.raises(ValueError, match="expected floating-point logits"):
        calibrated_decision(np.zeros((19, 4, 4), np.int32), tables)
    with pytest.raises(ValueError, match=r"expected k in \[1, 19\]"):
        calibrated_decision_topk(np.zeros((19, 4, 4), np.float32), tables, k=20)


def _identical_pairs(rng: np.random.Generator, c: int, k: int) -> tuple[Gmm, np.ndarray]:
    """Every positive pair = one mixture, every negative pair = another: F_cl equals its anchor."""
    w_p, w_n = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
    m_p, m_n = rng.normal(6, 2, k), rng.normal(-2, 2, k)
    s_p, s_n = rng.uniform(0.3, 2, k), rng.uniform(0.3, 2, k)
    diag = np.eye(c, dtype=bool)[:, :, None]
    pairs = Gmm(np.where(diag, w_p, w_n), np.where(diag, m_p, m_n), np.where(diag, s_p, s_n))
    return pairs, rng.integers(1, 1000, (c, c))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.0, 50.0), eps=st.sampled_from([0.001, 0.01, 0.1]))
def test_pairs_equal_to_their_anchors_give_zero_shift_and_the_raw_argmax(
    seed: int, tau: float, eps: float
) -> None:
    rng = np.random.default_rng(seed)
    c = 6
    pairs, counts = _identical_pairs(rng, c, 3)
    tables = build_calibration_tables(pairs, counts, eps=eps, num_knots=64)
    d = np.abs(tables.shifts.delta).max()
    # Zero up to the anchors' tabulation: a few knots of the inverse CDF table (larger in the gaps between
    # components, where x is ill-determined by F).
    width = max(
        float(np.ptp(gmm_quantile(np.array([eps, 1 - eps]), a)))
        for a in (tables.anchor_pos, tables.anchor_neg)
    )
    assert d < 2e-3 * width
    logits = random_logits(rng, c, 12, 16, 3.0) * 3
    got = calibrated_decision(logits, tables.shifts, tau=tau)
    raw = logits.argmax(0)
    top2 = np.sort(logits, axis=0)[-2:]
    # Only pixels within the exact bound of a tie (4 tau D) may change, and with D ~ 0 they are rare.
    sure = (top2[1] - top2[0]) > 4 * tau * d + 1e-4
    np.testing.assert_array_equal(got[sure], raw[sure])
    assert sure.mean() > 0.9


def test_shift_tables_map_pair_quantiles_to_anchor_quantiles() -> None:
    rng = np.random.default_rng(3)
    c, eps = 3, 0.01
    pairs = Gmm(
        rng.dirichlet(np.ones(2), (c, c)),
        rng.normal(0, 4, (c, c, 2)) + 8 * np.eye(c)[:, :, None],
        rng.uniform(0.3, 1.5, (c, c, 2)),
    )
    counts = rng.integers(10, 100, (c, c))
    counts[2, 0] = 0
    pos, neg = pool_mixtures(pairs, counts)
    t = build_shift_tables(pairs, pos, neg, counts, num_knots=256, eps=eps)
    for a in range(c):
        for b in range(c):
            if (a, b) == (2, 0):
                assert np.all(t.delta[a, b] == 0)
                continue
            lo, hi = gmm_quantile(np.array([eps, 1 - eps]), pairs[a, b])
            assert t.lo[a, b] == pytest.approx(lo, abs=1e-4)
            assert t.lo[a, b] + 255 * t.step[a, b] == pytest.approx(hi, rel=1e-4, abs=1e-3)
            z = np.linspace(lo, hi, 9)
            anchor = pos if a == b else neg
            want = inverse_cdf(np.clip(gmm_cdf(z, pairs[a, b]), eps, 1 - eps), anchor, 4096) - z
            got = np.array([reference_delta(t, a, b, v) for v in z])
            np.testing.assert_allclose(got, want, atol=2e-3)
    # Held constant beyond the grid: |Δ| is bounded by the largest knot value.
    far = shift_values(np.full((c, 2), 1e4, np.float32) * np.array([[-1, 1]], np.float32), t)
    assert np.abs(far).max() <= np.abs(t.delta).max() + 1e-6


def test_prepared_tables_are_not_confused_between_table_objects() -> None:
    """The per-table cache must follow the table object, also when a new one reuses a dead one's id."""
    rng = np.random.default_rng(9)
    c = 4
    logits = random_logits(rng, c, 5, 6, 1.0)
    for _ in range(5):
        tables = random_tables(rng, c, scale=3.0)
        ref, gap = reference_decision(logits, tables, 1.0)
        assert_same_decision(calibrated_decision(logits, tables, tau=1.0), ref, gap)
        del tables


def test_decisions_do_not_saturate_when_every_softmax_rounds_to_one() -> None:
    """Off-diagonal shifts of -100: every s_c rounds to 1.0, yet g_c = z_c - R_c + 100 still orders the
    hypotheses like the raw logits, so the exact rule is the raw argmax (not class 0 by a float tie)."""
    c, m = 4, 8
    delta = np.where(np.eye(c, dtype=bool)[:, :, None], 0.0, -100.0) * np.ones((c, c, m))
    tables = ShiftTables(np.zeros((c, c), np.float32), np.ones((c, c), np.float32), delta.astype(np.float32))
    logits = random_logits(np.random.default_rng(4), c, 6, 8, 2.0)
    raw = logits.argmax(0)
    for use_bound in (True, False):
        np.testing.assert_array_equal(calibrated_decision(logits, tables, tau=1.0, use_bound=use_bound), raw)
    np.testing.assert_array_equal(calibrated_decision_topk(logits, tables, tau=1.0, k=c), raw)
    np.testing.assert_array_equal(calibrated_decision_topk(logits, tables, tau=1.0, k=2), raw)
