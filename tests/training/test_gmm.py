"""Online GMMs: vectorised kernels against slow loops, recovery, momentum rules, Δ against the numpy core."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import ndtr

from calibration.alignment import ShiftTables, build_shift_tables, calibrated_decision, shift_values
from calibration.distributions import Gmm, pool_mixtures
from calibration.tables import build_calibration_tables
from training.uda.gmm import (
    GmmState,
    OnlineGmmConfig,
    build_anchors,
    build_shift_table,
    calibrated_scores,
    em_statistics,
    gmm_quantile,
    inverse_anchor,
    lookup_shift,
    m_step,
    pair_momentum,
    quantile_init,
    sample_pairs,
    shift_exact,
    shift_for_labels,
    to_numpy_gmm,
    update_gmm,
)


def _logits(seed: int, p: int = 3000, c: int = 5, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (p,), generator=g)
    z = torch.randn(p, c, generator=g, dtype=torch.float64).float() * 1.5 - 2 + offset
    z[torch.arange(p), y] += 6 + y.float()
    y[:50] = 255
    return z, y


def _fitted(c: int = 5, k: int = 3, iters: int = 4) -> GmmState:
    state = GmmState.empty(c, k)
    cfg = OnlineGmmConfig(components=k)
    g = torch.Generator().manual_seed(0)
    for it in range(iters):
        z, y = _logits(it, c=c)
        state = update_gmm(state, z, y, it, cfg, g)
    return state


def test_sample_pairs_matches_slow_selection() -> None:
    z, y = _logits(0, p=400, c=4)
    values, mask, counts = sample_pairs(z, y, samples_per_class=1000, generator=torch.Generator())
    for c in range(4):
        rows = z[y == c]  # (n_c, C)
        assert counts[c] == rows.shape[0] == int(mask[c].sum())
        for lo in range(4):
            got = np.sort(values[c, lo][mask[c]].numpy())
            np.testing.assert_array_equal(got, np.sort(rows[:, lo].numpy()))
    # Subsampled: at most S per class, each sample a whole pixel of that class.
    values, mask, _ = sample_pairs(z, y, samples_per_class=7, generator=torch.Generator().manual_seed(1))
    for c in range(4):
        assert int(mask[c].sum()) == min(7, int((y == c).sum()))
        pixels = {tuple(r) for r in z[y == c].numpy().tolist()}
        for s in np.flatnonzero(mask[c].numpy()):
            assert tuple(values[c, :, s].numpy().tolist()) in pixels


def test_em_statistics_match_a_slow_loop() -> None:
    rng = np.random.default_rng(0)
    c, s, k = 3, 20, 2
    values = torch.from_numpy(rng.normal(0, 3, (c, c, s)).astype(np.float32))
    mask = torch.from_numpy(rng.random((c, s)) > 0.3)
    w = torch.from_numpy(rng.dirichlet(np.ones(k), (c, c)))
    mu = torch.from_numpy(rng.normal(0, 2, (c, c, k)))
    sd = torch.from_numpy(rng.uniform(0.5, 2, (c, c, k)))
    stats = em_statistics(values, mask, w, mu, sd).numpy()
    for a in range(c):
        for b in range(c):
            n, s1, s2 = np.zeros(k), np.zeros(k), np.zeros(k)
            for i in range(s):
                if not mask[a, i]:
                    continue
                x = float(values[a, b, i])
                dens = np.array(
                    [
                        float(w[a, b, j])
                        * np.exp(-0.5 * ((x - float(mu[a, b, j])) / float(sd[a, b, j])) ** 2)
                        / float(sd[a, b, j])
                        for j in range(k)
                    ]
                )
                r = dens / dens.sum()
                d = x - mu[a, b].numpy()
                n += r
                s1 += r * d
                s2 += r * d * d
            np.testing.assert_allclose(stats[:, a, b], np.stack([n, s1, s2]), rtol=1e-4, atol=1e-4)


def test_quantile_init_places_means_at_data_quantiles() -> None:
    rng = np.random.default_rng(1)
    values = torch.from_numpy(rng.normal(5, 2, (2, 2, 101)))
    mask = torch.ones(2, 101, dtype=torch.bool)
    mask[1, 50:] = False
    w, mu, sd = quantile_init(values, mask, 4)
    np.testing.assert_allclose(w.numpy(), 0.25)
    for a in range(2):
        x = np.sort(values[a, 0][mask[a]].numpy())
        idx = np.floor((np.arange(4) + 0.5) / 4 * (x.size - 1)).astype(int)
        np.testing.assert_allclose(mu[a, 0].numpy(), x[idx])
    assert bool((sd > 0).all())


def test_em_recovers_a_two_component_mixture_far_from_zero() -> None:
    # Logits far from 0 (the reference's linear-space EM collapses there): log-space EM with
    # quantile initialisation and centred statistics recovers the mixture.
    rng = np.random.default_rng(2)
    n = 4000
    comp = rng.random(n) < 0.3
    x = np.where(comp, rng.normal(480, 1.0, n), rng.normal(500, 2.0, n))
    z = torch.from_numpy(np.stack([x, -x], 1).astype(np.float32))
    y = torch.zeros(n, dtype=torch.long)
    cfg = OnlineGmmConfig(components=2, em_steps=60, samples_per_class=n)
    state = update_gmm(GmmState.empty(1 + 1, 2), z, y, 0, cfg, torch.Generator())
    order = torch.argsort(state.means[0, 0])
    np.testing.assert_allclose(state.weights[0, 0][order].numpy(), [0.3, 0.7], atol=0.03)
    np.testing.assert_allclose(state.means[0, 0][order].numpy(), [480, 500], atol=0.3)
    np.testing.assert_allclose(state.stds[0, 0][order].numpy(), [1.0, 2.0], atol=0.2)
    assert not bool(state.initialized[1].any())  # class 1 never seen: untouched


def test_m_step_keeps_dead_components() -> None:
    stats = torch.zeros(3, 1, 1, 2, dtype=torch.float64)
    stats[0, 0, 0, 0] = 10.0
    stats[1, 0, 0, 0] = 5.0  # mean moves by +0.5
    stats[2, 0, 0, 0] = 10.0 * (1.0 + 0.25)  # var = 1.25 - 0.25 = 1
    w = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    mu = torch.tensor([[[1.0, 7.0]]], dtype=torch.float64)
    sd = torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    nw, nm, ns = m_step(stats, w, mu, sd)
    np.testing.assert_allclose(nw.numpy().ravel(), [1.0, 0.0])
    np.testing.assert_allclose(nm.numpy().ravel(), [1.5, 7.0])
    np.testing.assert_allclose(ns.numpy().ravel(), [1.0, 3.0])


def test_momentum_rules() -> None:
    cfg = OnlineGmmConfig(momentum=0.99, momentum_ramp_iters=100, catchup_after=5, catchup_momentum=0.5)
    state = GmmState.empty(2, 2)
    state.updates[:] = torch.tensor([[0, 1], [1000, 1000]])
    state.last_seen[:] = torch.tensor([[-1, 49], [49, 10]])
    m = pair_momentum(state, 50, cfg)
    assert m[0, 0] == 0.0  # never seen: take the batch estimate
    assert m[0, 1] == pytest.approx(0.5)  # u / (u + 1) with u = 1
    assert m[1, 0] == pytest.approx(0.99 * 51 / 100)  # ramp
    assert m[1, 1] == pytest.approx(0.5)  # missed 39 iterations: catch-up
    state.last_seen[1, 0] = 499
    assert float(pair_momentum(state, 500, cfg)[1, 0]) == pytest.approx(0.99)  # ramp done


def test_update_is_a_momentum_merge_of_the_batch_estimate() -> None:
    cfg = OnlineGmmConfig(
        components=2, em_steps=2, momentum=0.9, momentum_ramp_iters=1, samples_per_class=5000
    )
    z, y = _logits(0, c=3)
    s1 = update_gmm(GmmState.empty(3, 2), z, y, 0, cfg, torch.Generator())
    z2, y2 = _logits(1, c=3)
    s2 = update_gmm(s1, z2, y2, 1, cfg, torch.Generator())
    # The batch estimate: EM from the running state, no merge (first update of a fresh copy with u = 0).
    fresh = GmmState(s1.weights, s1.means, s1.stds, s1.counts, torch.ones_like(s1.updates), s1.last_seen)
    zero = OnlineGmmConfig(**{**cfg.__dict__, "momentum": 0.0})
    batch = update_gmm(fresh, z2, y2, 1, zero, torch.Generator())
    m = 0.5  # min(0.9, u / (u + 1)) with u = 1
    np.testing.assert_allclose(s2.means.numpy(), (m * s1.means + (1 - m) * batch.means).numpy(), rtol=1e-10)
    np.testing.assert_allclose(s2.stds.numpy() ** 2, (m * s1.stds**2 + (1 - m) * batch.stds**2).numpy())
    np.testing.assert_allclose(s2.counts.numpy(), batch.counts.numpy())
    assert int(s2.updates[0, 0]) == 2 and int(s2.last_seen[0, 0]) == 1


def _cdf_minus(w: np.ndarray, mu: np.ndarray, sd: np.ndarray, q: float) -> Callable[[float], float]:
    return lambda x: float((w * ndtr((x - mu) / sd)).sum()) - q


def test_gmm_quantile_inverts_the_cdf() -> None:
    state = _fitted()
    p = torch.tensor([0.01, 0.3, 0.99], dtype=torch.float64).expand(5, 5, 3).contiguous()
    q = gmm_quantile(p, state.weights, state.means, state.stds)
    w, mu, sd = (t.numpy() for t in (state.weights, state.means, state.stds))
    for a, b in [(0, 0), (2, 3)]:
        for j, pj in enumerate([0.01, 0.3, 0.99]):
            ref = brentq(_cdf_minus(w[a, b], mu[a, b], sd[a, b], pj), -200, 200)
            assert float(q[a, b, j]) == pytest.approx(ref, abs=1e-6)


def _core_tables(state: GmmState, knots: int = 256) -> ShiftTables:
    w, m, s, counts = to_numpy_gmm(state)
    pairs = Gmm(w, m, s)
    pos, neg = pool_mixtures(pairs, counts)
    return build_shift_tables(pairs, pos, neg, counts, num_knots=knots, eps=0.01)


def test_shift_table_agrees_with_the_numpy_core() -> None:
    state = _fitted()
    ref = _core_tables(state)
    mine = build_shift_table(state, build_anchors(state), num_knots=256, eps=0.01)
    np.testing.assert_allclose(mine.lo.numpy(), ref.lo, atol=1e-4)
    np.testing.assert_allclose(mine.step.numpy(), ref.step, rtol=1e-4)
    np.testing.assert_allclose(mine.delta.numpy(), ref.delta, atol=2e-3)
    # Look-ups at arbitrary logits (inside, between and beyond the grids).
    z = np.random.default_rng(0).normal(0, 8, (5, 700)).astype(np.float32)
    rows = (torch.arange(5).view(5, 1, 1) * 5 + torch.arange(5).view(1, 5, 1)).expand(5, 5, 700)
    got = lookup_shift(torch.from_numpy(z)[None].expand(5, 5, 700), rows, mine).numpy()
    np.testing.assert_allclose(got, shift_values(z, ref), atol=2e-3)


def test_shift_exact_matches_a_root_finding_reference() -> None:
    state = _fitted(c=3, k=2)
    anchors = build_anchors(state)
    w, m, s, counts = to_numpy_gmm(state)
    pos, neg = pool_mixtures(Gmm(w, m, s), counts)
    z = torch.linspace(-6, 12, 9, dtype=torch.float64).expand(3, 3, 9).contiguous()
    got = shift_exact(z, state, anchors, eps=0.01).numpy()
    for a in range(3):
        for b in range(3):
            anchor = pos if a == b else neg
            for j in range(9):
                x = float(z[a, b, j])
                q = np.clip(float((w[a, b] * ndtr((x - m[a, b]) / s[a, b])).sum()), 0.01, 0.99)
                f = _cdf_minus(anchor.weights, anchor.means, anchor.stds, q)
                assert got[a, b, j] == pytest.approx(brentq(f, -300, 300) - x, abs=5e-3)


@settings(max_examples=20, deadline=None)
@given(st.floats(-3, 3), st.floats(0.3, 3.0), st.floats(-50, 50))
def test_shift_is_zero_when_a_pair_equals_its_anchor(mu: float, sd: float, z: float) -> None:
    # Every pair has the same distribution, so both anchors equal it and Δ vanishes everywhere.
    state = GmmState.empty(2, 1)
    state.means[:] = mu
    state.stds[:] = sd
    state.weights[:] = 1.0
    state.counts[:] = 10
    state.updates[:] = 1
    table = build_shift_table(state, build_anchors(state), num_knots=128)
    delta = lookup_shift(torch.full((4,), z, dtype=torch.float32), torch.arange(4), table)
    assert float(delta.abs().max()) < 1e-3 * max(1.0, sd)


def test_inverse_anchor_is_monotone_and_inverts() -> None:
    state = _fitted()
    anchors = build_anchors(state)
    q = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    x = inverse_anchor(q, anchors.positive)
    assert bool((torch.diff(x) >= 0).all())
    t = anchors.positive
    back = np.interp(x.numpy(), t.x.numpy(), t.p.numpy())
    np.testing.assert_allclose(back, q.numpy(), atol=1e-6)


def test_shift_for_labels_picks_the_labelled_pair_and_zero_on_ignore() -> None:
    state = _fitted(c=4)
    table = build_shift_table(state, build_anchors(state))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, generator=g) * 4
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0, 0] = 255
    delta = shift_for_labels(logits, labels, table)
    ref = shift_values(logits.permute(1, 0, 2, 3).reshape(4, -1).numpy(), _as_core(table))  # (C, C, P)
    y = labels.reshape(-1).numpy()
    flat = delta.permute(1, 0, 2, 3).reshape(4, -1).numpy()
    for p in range(y.size):
        expected = np.zeros(4) if y[p] == 255 else ref[y[p], :, p]
        np.testing.assert_allclose(flat[:, p], expected, atol=1e-5)


def _as_core(table: object) -> ShiftTables:
    return ShiftTables(table.lo.numpy(), table.step.numpy(), table.delta.numpy())  # type: ignore[attr-defined]


def test_calibrated_scores_match_a_slow_loop_and_the_core_decision() -> None:
    state = _fitted(c=4)
    table = build_shift_table(state, build_anchors(state))
    logits = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(4)) * 3
    tau = 0.5
    scores = calibrated_scores(logits, table, tau).numpy()
    z = logits[0].reshape(4, -1).numpy()
    d = shift_values(z, _as_core(table))  # (C_hyp, C, P)
    for p in range(z.shape[1]):
        for c in range(4):
            shifted = z[:, p] + tau * d[c, :, p]
            s = np.exp(shifted - shifted.max())
            np.testing.assert_allclose(scores[0].reshape(4, -1)[c, p], s[c] / s.sum(), rtol=1e-5)
    np.testing.assert_array_equal(scores.argmax(1), calibrated_decision(logits.numpy(), _as_core(table), tau))
    top2 = calibrated_scores(logits, table, tau, top_k=2).numpy()
    raw_top2 = np.argsort(-logits.numpy(), axis=1)[:, :2]
    np.testing.assert_allclose(
        np.take_along_axis(top2, raw_top2, 1), np.take_along_axis(scores, raw_top2, 1), rtol=1e-6
    )


def test_a_source_without_some_classes_leaves_their_rows_empty_and_unshifted() -> None:
    """SYNTHIA has no terrain, truck or train: with a 19-way head those rows of the source GMMs are never
    estimated, and both the training-time tables and the exported numpy tables shift them by exactly 0."""
    c, k, missing = 5, 3, [1, 3]
    state = GmmState.empty(c, k)
    cfg = OnlineGmmConfig(components=k, min_pixels=1)
    g = torch.Generator().manual_seed(0)
    for it in range(4):
        z, y = _logits(it, c=c)
        y[(y == 1) | (y == 3)] = 255  # the source never labels classes 1 and 3
        state = update_gmm(state, z, y, it, cfg, g)
    present = [i for i in range(c) if i not in missing]
    assert not state.initialized[missing].any() and state.initialized[present].all()
    assert float(state.counts[missing].sum()) == 0.0
    # the logits of the missing classes are still seen on the other classes' pixels (their columns)
    assert state.initialized[present][:, missing].all()

    table = build_shift_table(state, build_anchors(state), num_knots=64, eps=0.01)
    assert torch.count_nonzero(table.delta[missing]) == 0
    assert torch.count_nonzero(table.delta[present]) > 0
    z, _ = _logits(9, p=64, c=c)
    logits = z.T.reshape(1, c, 8, 8)
    labels = torch.full((1, 8, 8), 3)
    assert torch.count_nonzero(shift_for_labels(logits, labels, table)) == 0

    w, m, s, counts = to_numpy_gmm(state)
    assert (counts[missing] == 0).all()
    core = build_calibration_tables(Gmm(w, m, s), counts, num_knots=64)
    assert np.count_nonzero(core.shifts.delta[missing]) == 0
    assert np.count_nonzero(core.shifts.delta[present]) > 0
