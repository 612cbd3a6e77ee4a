"""Gaussian mixtures: CDF/log-pdf against scipy, the robust fit, pooling, inverse CDFs, empirical tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from calibration.distributions import (
    Gmm,
    empirical_cdf,
    empirical_quantile,
    fit_empirical,
    fit_gmm,
    fit_gmm_batch,
    fit_pair_gmms,
    gmm_cdf,
    gmm_logpdf,
    gmm_quantile,
    inverse_cdf,
    pool_mixtures,
)

TRUE = Gmm(np.array([0.2, 0.5, 0.3]), np.array([-3.0, 0.0, 4.0]), np.array([0.5, 1.0, 0.8]))


def _random_gmm(rng: np.random.Generator, batch: tuple[int, ...], k: int, scale: float = 3.0) -> Gmm:
    w = rng.dirichlet(np.ones(k), size=batch)
    return Gmm(w, rng.normal(0, scale, (*batch, k)), rng.uniform(0.1, 2.0, (*batch, k)))


def _draw(g: Gmm, n: int, rng: np.random.Generator) -> np.ndarray:
    comp = rng.choice(g.num_components, size=n, p=g.weights)
    return rng.normal(g.means[comp], g.stds[comp])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_cdf_is_monotone_in_unit_interval(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    g = _random_gmm(rng, (3, 2), k, scale=rng.uniform(0.1, 50))
    x = np.sort(rng.normal(0, 60, (3, 2, 200)), axis=-1)
    f = gmm_cdf(x, g)
    assert f.shape == x.shape
    assert np.all((f >= 0) & (f <= 1))
    assert np.all(np.diff(f, axis=-1) >= -1e-12)


def test_cdf_and_logpdf_match_scipy() -> None:
    x = np.linspace(-8, 9, 101)
    ref_cdf = sum(
        w * stats.norm.cdf(x, m, s) for w, m, s in zip(TRUE.weights, TRUE.means, TRUE.stds, strict=True)
    )
    ref_pdf = sum(
        w * stats.norm.pdf(x, m, s) for w, m, s in zip(TRUE.weights, TRUE.means, TRUE.stds, strict=True)
    )
    np.testing.assert_allclose(gmm_cdf(x, TRUE), ref_cdf, atol=1e-12)
    np.testing.assert_allclose(np.exp(gmm_logpdf(x, TRUE)), ref_pdf, rtol=1e-10)
    total, _ = integrate.quad(lambda t: float(np.exp(gmm_logpdf(np.array([t]), TRUE))[0]), -np.inf, np.inf)
    assert total == pytest.approx(1.0, abs=1e-8)


def test_batched_cdf_equals_per_mixture() -> None:
    rng = np.random.default_rng(1)
    g = _random_gmm(rng, (4, 3), 5)
    x = rng.normal(0, 4, (4, 3, 17))
    out = gmm_cdf(x, g)
    for i in range(4):
        for j in range(3):
            np.testing.assert_allclose(out[i, j], gmm_cdf(x[i, j], g[i, j]), atol=1e-14)


def test_zero_weight_components_are_ignored_and_shapes_checked() -> None:
    g = Gmm(np.array([1.0, 0.0]), np.array([0.0, 100.0]), np.array([1.0, 1e-9]))
    assert np.all(np.isfinite(gmm_logpdf(np.array([0.0, 100.0]), g)))
    np.testing.assert_allclose(gmm_cdf(np.array([0.0]), g), [0.5])
    with pytest.raises(ValueError, match=r"expected x of shape \(\*B, N\)"):
        gmm_cdf(np.zeros((2, 3)), g)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.001, 0.01, 0.05]))
def test_inverse_cdf_inverts_inside_the_clamp(seed: int, eps: float) -> None:
    rng = np.random.default_rng(seed)
    # Pooled anchors have many components of very different widths.
    g = _random_gmm(rng, (), int(rng.integers(1, 40)), scale=rng.uniform(0.5, 30))
    lo, hi = gmm_quantile(np.array([eps, 1 - eps]), g)
    x = np.linspace(lo, hi, 301)
    back = inverse_cdf(gmm_cdf(x, g), g, num_knots=1024)
    spread = gmm_quantile(np.array([1 - eps]), g)[0] - gmm_quantile(np.array([eps]), g)[0]
    # In probability everywhere; in x wherever x is determined by F (not in a gap between components).
    assert np.max(np.abs(gmm_cdf(back, g) - gmm_cdf(x, g))) < 2e-4
    dense = np.exp(gmm_logpdf(x, g)) * spread > 0.05
    assert np.max(np.abs(back - x)[dense]) < 2e-3 * spread + 1e-6
    p = np.linspace(eps, 1 - eps, 50)
    assert np.all(np.diff(inverse_cdf(p, g)) > 0)
    np.testing.assert_allclose(gmm_cdf(gmm_quantile(p, g), g), p, atol=1e-9)


def _sorted_params(g: Gmm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(g.means)
    return g.weights[order], g.means[order], g.stds[order]


@settings(max_examples=12, deadline=None)
@given(offset=st.floats(-100, 100), scale=st.floats(1e-3, 20.0), seed=st.integers(0, 1000))
def test_fit_recovers_known_mixture_anywhere(offset: float, scale: float, seed: int) -> None:
    """Far from 0 or with a tiny spread, the fit finds the same mixture (no collapse)."""
    rng = np.random.default_rng(seed)
    x = offset + scale * _draw(TRUE, 20000, rng)
    w, m, s = _sorted_params(fit_gmm(x, k=3))
    np.testing.assert_allclose(w, TRUE.weights, atol=0.03)
    np.testing.assert_allclose((m - offset) / scale, TRUE.means, atol=0.08)
    np.testing.assert_allclose(s / scale, TRUE.stds, rtol=0.1)


def test_fit_with_more_components_than_needed_keeps_the_distribution() -> None:
    rng = np.random.default_rng(3)
    x = 40.0 + _draw(TRUE, 5000, rng)
    g = fit_gmm(x, k=5)
    grid = np.linspace(30, 50, 200)
    ks = np.max(np.abs(gmm_cdf(grid, g) - np.searchsorted(np.sort(x), grid) / x.size))
    assert ks < 0.02
    assert np.all(g.stds > 0) and g.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "samples",
    [np.full(50, -60.0), np.full(1, 7.5), np.array([1.0, 2.0]), np.array([3.0, 3.0, 3.0, 3.0 + 1e-9])],
)
def test_fit_degenerate_samples_has_a_variance_floor(samples: np.ndarray) -> None:
    g = fit_gmm(samples, k=5)
    assert np.all(np.isfinite(g.means)) and np.all(g.stds > 0)
    assert g.weights.sum() == pytest.approx(1.0)
    assert g.mean() == pytest.approx(samples.mean(), abs=1e-6)
    assert np.all(np.isfinite(gmm_logpdf(samples, g)))


def test_batched_fit_handles_empty_rows_and_matches_single_fits() -> None:
    rng = np.random.default_rng(4)
    x = np.zeros((3, 3000))
    mask = np.zeros((3, 3000), dtype=bool)
    x[0, :3000] = 40.0 + _draw(TRUE, 3000, rng)
    mask[0] = True
    x[2, :500] = -5.0 + 0.01 * _draw(TRUE, 500, rng)
    mask[2, :500] = True
    g = fit_gmm_batch(x, mask, k=3)
    assert g.batch_shape == (3,)
    np.testing.assert_allclose(g.weights[1], [1.0, 0.0, 0.0])
    for row in (0, 2):
        single = fit_gmm(x[row][mask[row]], k=3)
        for a, b in zip(_sorted_params(g[row]), _sorted_params(single), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_fit_pair_gmms_recovers_pair_means_and_counts() -> None:
    rng = np.random.default_rng(5)
    c, n, h, w = 4, 2, 30, 40
    labels = rng.integers(0, c, (n, h, w))
    labels[0, :2] = 255
    mu = rng.normal(0, 3, (c, c)) + 8 * np.eye(c)  # mean of logit l on pixels of class c
    lab = np.where(labels == 255, 0, labels)
    logits = mu[lab].transpose(0, 3, 1, 2) + rng.normal(0, 0.5, (n, c, h, w))
    g, counts = fit_pair_gmms(logits, labels, c, k=2, max_samples=100_000)
    assert g.batch_shape == (c, c) and counts.dtype == np.int64
    true_counts = np.bincount(labels[labels != 255], minlength=c)
    np.testing.assert_array_equal(counts, np.repeat(true_counts[:, None], c, axis=1))
    np.testing.assert_allclose(g.mean(), mu, atol=0.05)
    np.testing.assert_allclose(g.std(), 0.5, rtol=0.1)
    sub, sub_counts = fit_pair_gmms(logits, labels, c, k=2, max_samples=50)
    np.testing.assert_array_equal(sub_counts, counts)  # counts are of all pixels, not of the subsample
    np.testing.assert_allclose(sub.mean(), mu, atol=0.3)
    with pytest.raises(ValueError, match=r"expected logits of shape \(C, H, W\) or \(N, C, H, W\) with C=5"):
        fit_pair_gmms(logits, labels, 5)


def test_pool_mixtures_is_the_count_weighted_mixture() -> None:
    rng = np.random.default_rng(6)
    c = 3
    pairs = _random_gmm(rng, (c, c), 2)
    counts = rng.integers(0, 50, (c, c))
    counts[1, 1] = 0
    pos, neg = pool_mixtures(pairs, counts)
    x = np.linspace(-10, 10, 50)
    diag = np.eye(c, dtype=bool)
    ref_pos = sum(counts[i, i] * gmm_cdf(x, pairs[i, i]) for i in range(c)) / counts[diag].sum()
    ref_neg = (
        sum(counts[i, j] * gmm_cdf(x, pairs[i, j]) for i in range(c) for j in range(c) if i != j)
        / counts[~diag].sum()
    )
    np.testing.assert_allclose(gmm_cdf(x, pos), ref_pos, atol=1e-12)
    np.testing.assert_allclose(gmm_cdf(x, neg), ref_neg, atol=1e-12)
    assert pos.num_components == 2 * 2  # the zero-count pair is dropped


def test_empirical_distribution_matches_samples_and_inverts() -> None:
    rng = np.random.default_rng(7)
    x = _draw(TRUE, 20000, rng)
    emp = fit_empirical(x[None, :], num_quantiles=257)
    grid = np.linspace(-4, 5, 40)[None, :]
    np.testing.assert_allclose(empirical_cdf(grid, emp), gmm_cdf(grid[0], TRUE)[None], atol=0.02)
    p = np.linspace(0.02, 0.98, 30)[None, :]
    np.testing.assert_allclose(empirical_cdf(empirical_quantile(p, emp), emp), p, atol=1e-6)
