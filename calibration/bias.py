"""Class-bias measures: with labels (confusion matrix, IoU, the paper's Bias) and without (logits)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibration.distributions import Gmm, gmm_quantile, pool_mixtures, tabulate_cdf
from calibration.labels import IGNORE_INDEX

# Quantile levels for distances between distributions: midpoints of 200 equal slices of (0, 1).
_LEVELS = (np.arange(200) + 0.5) / 200


def confusion_matrix(
    pred: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """pred, labels (...) same shape -> (C, C) int64 counts, rows = true class, columns = predicted.

    Pixels whose label is ignore_index or outside [0, C) are skipped.
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"expected pred and labels of the same shape, got {pred.shape} and {labels.shape}")
    lab = labels.reshape(-1).astype(np.int64)
    prd = pred.reshape(-1).astype(np.int64)
    valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
    prd_v = prd[valid]
    if prd_v.size and (prd_v.min() < 0 or prd_v.max() >= num_classes):
        raise ValueError(
            f"expected predictions in [0, {num_classes}), got values in [{prd_v.min()}, {prd_v.max()}]"
        )
    counts = np.bincount(lab[valid] * num_classes + prd_v, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """(C, C) -> (C,) intersection over union; nan where a class is in neither labels nor predictions."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def subset_mean_iou(conf: np.ndarray, classes: Sequence[int]) -> float:
    """(C, C) confusion of a C-way model, class indices -> mean IoU over those classes (nan if none of
    them is in the labels or predictions).

    The SYNTHIA -> Cityscapes protocol: a 19-way head, each class's IoU from the full 19-way confusion (a
    road pixel predicted as terrain still counts against road), averaged over 16 or 13 of the classes.
    """
    conf = np.asarray(conf)
    c = conf.shape[0]
    idx = np.asarray(list(classes), dtype=np.int64)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= c:
        raise ValueError(f"classes: expected indices in [0, {c}), got {list(classes)}")
    iou = iou_from_confusion(conf)[idx]
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def bias_from_confusion(conf: np.ndarray) -> np.ndarray:
    """(C, C) -> (C,) the paper's Bias(l) = mean_c P(pred = l | y = c) - 1/C over the classes c present.

    Sums to 0 over l (each present row is a distribution over predictions); > 0 means over-predicted.
    All zeros when no class is present.
    """
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    rows = conf.sum(axis=1)
    present = rows > 0
    if not present.any():
        return np.zeros(c)
    p = conf[present] / rows[present, None]  # (C_present, C)
    return p.mean(axis=0) - 1.0 / c


def _pooled_negative(pairs: Gmm, counts: np.ndarray) -> Gmm:
    """For each logit l, the mixture of its negative pairs (c ≠ l) weighted by counts -> Gmm (C, (C-1)K)."""
    c, _, k = pairs.weights.shape
    off = ~np.eye(c, dtype=bool)
    cw = np.where(off, np.asarray(counts, dtype=np.float64), 0.0)  # (C, C) [c, l]
    tot = cw.sum(axis=0)  # (C,) per logit l
    cw = np.where(tot[None, :] > 0, cw / np.where(tot > 0, tot, 1.0)[None, :], off / max(c - 1, 1))
    # Per logit l (rows of the result): components of pairs (c, l), c ≠ l.
    w = (cw[..., None] * pairs.weights).transpose(1, 0, 2)  # (l, c, K)
    sel = off.T  # (l, c): c ≠ l
    return Gmm(
        w[sel].reshape(c, (c - 1) * k),
        pairs.means.transpose(1, 0, 2)[sel].reshape(c, (c - 1) * k),
        pairs.stds.transpose(1, 0, 2)[sel].reshape(c, (c - 1) * k),
    )


def _anchor_quantiles(anchor: Gmm, levels: np.ndarray) -> np.ndarray:
    # 1024 knots: these quantiles feed averages over 200 levels, not per-pixel shifts.
    x, f = tabulate_cdf(anchor, 1024)
    return np.interp(levels, f, x)


def _robust_scale(q: np.ndarray) -> float:
    # Interquartile range of a normal is 1.349 std.
    iqr = float(np.interp(0.75, _LEVELS, q) - np.interp(0.25, _LEVELS, q))
    return max(iqr / 1.349, 1e-6)


def label_free_bias(pairs: Gmm, counts: np.ndarray) -> np.ndarray:
    """Pair mixtures (C, C, K), counts (C, C) -> (C,) signed bias of each class, without labels.

    Choice: for class l, the mean quantile difference (a signed Wasserstein-1 on the levels 0.0025..0.9975)
    between its positive distribution F_ll and the positive anchor, plus the same between its pooled
    negative distribution (logit l on pixels of other classes) and the negative anchor, each divided by the
    anchor's robust spread (IQR / 1.349), halved. Positive: the logits of l run high both where l is true
    and where it is not, so l wins comparisons it should not: over-prediction, which is the sign of the
    paper's Bias(l) and ranks classes like it. The anchors pool the same pairs (pool_mixtures), so the
    values are relative to a count-weighted average class. nan for a class without positive or without
    negative pixels.
    """
    c = pairs.batch_shape[0]
    counts = np.asarray(counts)
    anchor_pos, anchor_neg = pool_mixtures(pairs, counts)
    qa_pos = _anchor_quantiles(anchor_pos, _LEVELS)
    qa_neg = _anchor_quantiles(anchor_neg, _LEVELS)
    idx = np.arange(c)
    pos = pairs[idx, idx]  # (C, K)
    q_pos = gmm_quantile(np.broadcast_to(_LEVELS, (c, _LEVELS.size)), pos)  # (C, Q)
    q_neg = _quantiles_of_large(_pooled_negative(pairs, counts))  # (C, Q)
    d_pos = (q_pos - qa_pos[None]).mean(axis=1) / _robust_scale(qa_pos)
    d_neg = (q_neg - qa_neg[None]).mean(axis=1) / _robust_scale(qa_neg)
    # Without positive pixels (or without negative ones) the class has no distribution to compare.
    seen = (np.diag(counts) > 0) & (np.where(~np.eye(c, dtype=bool), counts, 0).sum(axis=0) > 0)
    return np.where(seen, 0.5 * (d_pos + d_neg), np.nan)


def _quantiles_of_large(g: Gmm) -> np.ndarray:
    """Quantiles at _LEVELS of each mixture of a batch (B, K) with many components, by tabulation."""
    return np.stack([_anchor_quantiles(g[i], _LEVELS) for i in range(g.batch_shape[0])])


def anchor_distance(dist: Gmm, anchor: Gmm) -> np.ndarray:
    """Wasserstein-1 between each mixture of a batch (*B, K) and one anchor (Ka,) -> (*B,).

    W1 = ∫ |F^-1(q) - A^-1(q)| dq, by the midpoint rule on 200 quantile levels.
    """
    if anchor.batch_shape != ():
        raise ValueError(f"expected a single anchor mixture (batch shape ()), got {anchor.batch_shape}")
    qa = _anchor_quantiles(anchor, _LEVELS)  # (Q,)
    batch = dist.batch_shape
    q = gmm_quantile(np.broadcast_to(_LEVELS, (*batch, _LEVELS.size)), dist)  # (*B, Q)
    return np.abs(q - qa).mean(axis=-1)


def calibration_default(raw: np.ndarray, calibrated: dict[float, np.ndarray]) -> dict[str, object]:
    """The rule that sets a bundle's calibration default, from held-out confusions (C, C): the τ with the
    best mIoU, and calibration on only when it beats raw there (`blda export`, `blda bundle create`)."""

    def miou(conf: np.ndarray) -> float:
        iou = iou_from_confusion(conf)
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0

    raw_miou = miou(raw)
    scores = {float(tau): miou(conf) for tau, conf in calibrated.items()}
    best = max(scores, key=lambda t: scores[t]) if scores else 0.2
    enabled = bool(scores) and scores[best] > raw_miou
    return {
        "raw_miou": raw_miou,
        "calibrated_miou": {f"{t:g}": m for t, m in scores.items()},
        "tau": float(best),
        "enabled": enabled,
        "summary": (
            f"calibration at τ={best:g} {'raised' if enabled else 'did not raise'} mIoU "
            f"({raw_miou * 100:.2f} raw, {scores.get(best, raw_miou) * 100:.2f} calibrated)"
        ),
    }
