"""The classical calibrators (calibration.calibrators) and ECE against slow loop twins and known truths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from test_alignment import random_logits, random_tables, reference_delta
from test_segmentation import reference_upsample

from calibration.calibrators.calibrator import Calibrator, calibrator_probabilities, decide_calibrator
from calibration.calibrators.fit import choose_default, parse_names
from calibration.calibrators.priors import (
    class_priors,
    estimate_target_priors,
    logit_adjustment,
    prior_offset,
)
from calibration.calibrators.temperature import bcts_nll, fit_bcts
from calibration.reliability import top_label_ece
from calibration.segmentation import decide


def test_logit_adjustment_subtracts_tau_log_source_priors() -> None:
    counts = np.array([700.0, 200.0, 100.0])
    priors = class_priors(counts)
    got = logit_adjustment(priors, 0.5)
    for c in range(3):
        assert got[c] == pytest.approx(-0.5 * np.log(counts[c] / counts.sum()))
    # Frequent classes lose the most: the sign of the correction.
    assert got[0] < got[1] < got[2]


def reference_em(probs: np.ndarray, source: np.ndarray, iters: int) -> np.ndarray:
    """Saerens et al. (2002), one pixel and one class at a time."""
    c, p = probs.shape
    prior = source.copy()
    for _ in range(iters):
        total = np.zeros(c)
        for i in range(p):
            w = [probs[k, i] * prior[k] / source[k] for k in range(c)]
            s = sum(w)
            for k in range(c):
                total[k] += w[k] / s
        prior = total / p
    return prior


def label_shifted_posteriors(
    rng: np.random.Generator, source: np.ndarray, target: np.ndarray, n: int
) -> np.ndarray:
    """Pixels drawn under the target prior, with the exact posteriors of a model trained under the source
    prior (1-D Gaussian classes): (C, n)."""
    c = source.size
    means = np.arange(c) * 1.5
    y = rng.choice(c, n, p=target)
    x = rng.normal(means[y], 1.0)
    like = np.exp(-0.5 * (x[None] - means[:, None]) ** 2) * source[:, None]
    return like / like.sum(axis=0, keepdims=True)


def test_em_equals_the_loop_and_recovers_the_target_prior() -> None:
    rng = np.random.default_rng(0)
    source = np.array([0.5, 0.3, 0.2])
    target = np.array([0.15, 0.25, 0.6])
    probs = label_shifted_posteriors(rng, source, target, 200)
    got = estimate_target_priors(probs, source, max_iter=7, tol=0.0)
    np.testing.assert_allclose(got.priors, reference_em(probs, source, 7), rtol=1e-9, atol=1e-12)
    assert got.iterations == 7 and not got.converged
    big = estimate_target_priors(label_shifted_posteriors(rng, source, target, 40_000), source, max_iter=500)
    assert big.converged
    np.testing.assert_allclose(big.priors, target, atol=0.02)
    # The offset moves source posteriors to the target prior: log(π_t / π_s).
    np.testing.assert_allclose(prior_offset(big.priors, source), np.log(big.priors / source), atol=1e-9)


def test_bcts_recovers_a_known_temperature_and_bias_and_matches_a_derivative_free_fit() -> None:
    rng = np.random.default_rng(1)
    c, n = 4, 6000
    z = rng.normal(0, 3, (c, n))
    t0, b0 = 2.0, np.array([0.8, -0.4, 0.1, -0.5])
    u = z / t0 + b0[:, None]
    p = np.exp(u - u.max(0)) / np.exp(u - u.max(0)).sum(0)
    y = np.array([rng.choice(c, p=p[:, i]) for i in range(n)])
    fit = fit_bcts(z, y)
    assert fit.temperature == pytest.approx(t0, rel=0.1)
    np.testing.assert_allclose(fit.bias, b0 - b0.mean(), atol=0.12)
    # An independent fit of the same likelihood: Nelder-Mead on (T, b_1.., b_{C-1}) (b_0 = 0), no gradient.
    ref = minimize(
        lambda th: bcts_nll(z, y, abs(th[0]), np.concatenate([[0.0], th[1:]])),
        np.concatenate([[1.0], np.zeros(c - 1)]),
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 20000, "maxfev": 20000},
    )
    ref_b = np.concatenate([[0.0], ref.x[1:]])
    assert fit.temperature == pytest.approx(abs(ref.x[0]), rel=1e-3)
    np.testing.assert_allclose(fit.bias, ref_b - ref_b.mean(), atol=2e-3)
    assert fit.nll <= ref.fun + 1e-7


def reference_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label ECE, one pixel at a time: bin (k-1)/B < conf <= k/B (conf 0 in the first bin)."""
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for i in range(labels.size):
        conf = float(probs[:, i].max())
        k = 0
        while conf > (k + 1) / bins:
            k += 1
        members[min(k, bins - 1)].append((conf, int(probs[:, i].argmax()) == labels[i]))
    total = 0.0
    for m in members:
        if m:
            acc = sum(ok for _, ok in m) / len(m)
            conf = sum(c for c, _ in m) / len(m)
            total += len(m) / labels.size * abs(acc - conf)
    return total


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(2, 6), n=st.integers(1, 300))
def test_ece_equals_the_per_pixel_loop(seed: int, c: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (c, n))
    probs = np.exp(z) / np.exp(z).sum(0)
    probs[:, : n // 4] = np.round(probs[:, : n // 4] * 15) / 15  # confidences on bin edges
    probs /= probs.sum(0)
    labels = rng.integers(0, c, n)
    assert top_label_ece(probs, labels) == pytest.approx(reference_ece(probs, labels, 15), abs=1e-12)


def test_offset_decisions_are_the_argmax_of_offset_upsampled_logits() -> None:
    rng = np.random.default_rng(2)
    c = 5
    logits = random_logits(rng, c, 4, 5, spread=1.0)
    b = rng.normal(0, 1.5, c).astype(np.float32)
    size = (11, 13)
    made = decide(logits, size, offset=b, band_pixels=2 * size[1])
    up = reference_upsample(logits.astype(np.float64), *size)
    np.testing.assert_array_equal(made.raw, up.argmax(0))  # the raw decision never gets the offset
    np.testing.assert_array_equal(made.calibrated[0], (up + b[:, None, None]).argmax(0))
    assert (made.calibrated[0] != made.raw).any(), "the case must exercise the offset"
    chosen = np.take_along_axis(up, made.calibrated[0][None].astype(np.intp), 0)[0]
    np.testing.assert_allclose(made.calibrated_logit[0], chosen, rtol=1e-5, atol=1e-5)


def reference_offset_scores(z: np.ndarray, tables, tau: float, b: np.ndarray) -> np.ndarray:
    """s_c = softmax_l(z_l + τΔ_cl(z_l) + b_l)[c], one hypothesis at a time: (C,)."""
    c = z.size
    s = np.empty(c)
    for h in range(c):
        a = np.array([z[j] + tau * reference_delta(tables, h, j, z[j]) + b[j] for j in range(c)])
        e = np.exp(a - a.max())
        s[h] = e[h] / e.sum()
    return s


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_blda_with_an_offset_equals_the_per_pixel_rule(tau: float) -> None:
    rng = np.random.default_rng(3)
    c = 5
    tables = random_tables(rng, c)
    logits = random_logits(rng, c, 3, 4, spread=1.0)
    b = rng.normal(0, 1.0, c).astype(np.float32)
    size = (7, 9)
    made = decide(logits, size, tables, (tau,), offset=b, band_pixels=2 * size[1])
    plain = decide(logits, size, tables, (tau,))
    up = reference_upsample(logits.astype(np.float64), *size).astype(np.float32)
    ref = np.empty(size, np.int64)
    for i in range(size[0]):
        for j in range(size[1]):
            ref[i, j] = reference_offset_scores(up[:, i, j].astype(np.float64), tables, tau, b).argmax()
    np.testing.assert_array_equal(made.calibrated[0], ref)
    np.testing.assert_array_equal(made.raw, plain.raw)
    assert (made.calibrated[0] != plain.calibrated[0]).any(), "the offset must change some decisions"


def test_probabilities_of_each_kind_equal_the_per_pixel_formula() -> None:
    rng = np.random.default_rng(4)
    c = 4
    tables = random_tables(rng, c)
    z = random_logits(rng, c, 1, 30, spread=1.0)[:, 0]  # (C, P)
    b = rng.normal(0, 1, c)
    scaled = calibrator_probabilities(z, Calibrator("bcts", temperature=1.7, bias=b))
    ref = np.exp(z / 1.7 + b[:, None])
    np.testing.assert_allclose(scaled, ref / ref.sum(0), rtol=1e-6)
    blda = calibrator_probabilities(z, Calibrator("blda+em-prior", bias=b, tau=0.4), tables)
    for i in range(z.shape[1]):
        s = reference_offset_scores(z[:, i].astype(np.float64), tables, 0.4, b)
        np.testing.assert_allclose(blda[:, i], s / s.sum(), rtol=1e-4, atol=1e-6)


def test_a_temperatures_decision_scales_the_bias_by_it() -> None:
    """argmax(z / T + b) = argmax(z + T b): the decision of BCTS is its probabilities' argmax."""
    rng = np.random.default_rng(5)
    c = 6
    logits = random_logits(rng, c, 5, 6, spread=1.5)
    cal = Calibrator("bcts", temperature=3.0, bias=rng.normal(0, 1.0, c))
    made = decide_calibrator(logits, (5, 6), cal)
    probs = calibrator_probabilities(logits.reshape(c, -1), cal)
    np.testing.assert_array_equal(made.calibrated[0].reshape(-1), probs.argmax(0))
    none = decide_calibrator(logits, (5, 6), Calibrator("none"))
    np.testing.assert_array_equal(none.calibrated[0], none.raw)


def test_names_and_default() -> None:
    assert parse_names("blda,none") == ["none", "blda"]
    assert "blda" not in parse_names("all", with_tables=False)
    with pytest.raises(ValueError, match="expected names among"):
        parse_names("platt")
    with pytest.raises(ValueError, match="expected calibration tables"):
        parse_names("blda", with_tables=False)
    rows = [{"calibrator": "none", "miou": 0.5}, {"calibrator": "blda", "miou": 0.5}]
    assert choose_default(rows) == "none"  # a tie keeps the raw decision
    assert choose_default([*rows, {"calibrator": "em-prior", "miou": 0.51}]) == "em-prior"
    with pytest.raises(ValueError, match="expected one of"):
        Calibrator("platt")


def test_strengths_are_chosen_on_the_tuning_images_and_em_finds_the_target_prior() -> None:
    """A model trained under a skewed source prior: its logits carry log π_s, which logit adjustment at
    τ = 1 removes exactly; on balanced target images that τ wins, and EM finds the balanced prior."""
    from calibration.calibrators.evaluation import LogitImage
    from calibration.calibrators.fit import FitInputs, fit_calibrators

    rng = np.random.default_rng(7)
    c, h, w = 3, 12, 16
    source = np.array([0.8, 0.1, 0.1])

    def image() -> tuple[np.ndarray, np.ndarray]:
        label = rng.integers(0, c, (h, w))
        z = np.log(source)[:, None, None] + 1.5 * np.eye(c)[label].transpose(2, 0, 1)
        return (z + rng.normal(0, 1.0, (c, h, w))).astype(np.float32), label

    tuning = [LogitImage(*image(), (h, w)) for _ in range(6)]
    target = np.concatenate([image()[0].reshape(c, -1) for _ in range(6)], axis=1)
    src_y = rng.choice(c, 3000, p=source)
    src_z = np.log(source)[:, None] + 1.5 * np.eye(c)[src_y].T + rng.normal(0, 1.0, (c, 3000))
    inputs = FitInputs(source, target, src_z, src_y, tuning)
    fitted = fit_calibrators(inputs, ["none", "logit-adjust", "em-prior"])
    scores = fitted["logit-adjust"].fit["tuning_miou_by_tau"]
    assert fitted["logit-adjust"].fit["strength"] == 1.0 == float(max(scores, key=scores.get))
    np.testing.assert_allclose(fitted["em-prior"].fit["target_priors"], np.full(c, 1 / c), atol=0.05)
