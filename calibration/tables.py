"""Calibration tables: pair mixtures of both domains, source anchors and the shift tables built from them.

`to_arrays` / `from_arrays` give the flat, validated array form stored in a bundle's calibration.npz.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.alignment import ShiftTables, build_shift_tables
from calibration.distributions import Gmm, gmm_cdf, pool_mixtures


class CalibrationFormatError(ValueError):
    """A field of the array form is missing or malformed. str() = "<field>: <message>"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class CalibrationTables:
    source: Gmm  # (C, C, K) labelled source logits
    source_counts: np.ndarray  # (C, C) int64
    target: Gmm  # (C, C, K) target logits with pseudo-labels (= source when none)
    target_counts: np.ndarray  # (C, C) int64
    anchor_pos: Gmm  # (Ka,) from source
    anchor_neg: Gmm  # (Kn,) from source
    shifts: ShiftTables  # built from target pairs and source anchors: what inference uses
    eps: float

    @property
    def num_classes(self) -> int:
        return int(self.source_counts.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, g in (
            ("source", self.source),
            ("target", self.target),
            ("anchor_pos", self.anchor_pos),
            ("anchor_neg", self.anchor_neg),
        ):
            out[f"{name}_weights"] = np.asarray(g.weights, dtype=np.float64)
            out[f"{name}_means"] = np.asarray(g.means, dtype=np.float64)
            out[f"{name}_stds"] = np.asarray(g.stds, dtype=np.float64)
        out["source_counts"] = np.asarray(self.source_counts, dtype=np.int64)
        out["target_counts"] = np.asarray(self.target_counts, dtype=np.int64)
        out["shift_lo"] = np.asarray(self.shifts.lo, dtype=np.float32)
        out["shift_step"] = np.asarray(self.shifts.step, dtype=np.float32)
        out["shift_delta"] = np.asarray(self.shifts.delta, dtype=np.float32)
        out["eps"] = np.asarray(self.eps, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray] | object) -> CalibrationTables:
        """Validate and assemble; raises CalibrationFormatError naming the field and what was expected."""
        get = _Fields(arrays)
        s_w = get.float_array("source_weights", ndim=3)
        c, c2, k = s_w.shape
        if c != c2 or c < 1:
            raise CalibrationFormatError("source_weights", f"expected shape (C, C, K), got {s_w.shape}")
        pair_shape = (c, c, k)
        source = get.gmm("source", pair_shape)
        target = get.gmm("target", pair_shape)
        s_counts = get.int_array("source_counts", (c, c))
        t_counts = get.int_array("target_counts", (c, c))
        ka = get.float_array("anchor_pos_weights", ndim=1).shape
        kn = get.float_array("anchor_neg_weights", ndim=1).shape
        anchor_pos = get.gmm("anchor_pos", ka)
        anchor_neg = get.gmm("anchor_neg", kn)
        lo = get.float_array("shift_lo", shape=(c, c))
        step = get.float_array("shift_step", shape=(c, c))
        delta = get.float_array("shift_delta", ndim=3)
        if delta.shape[:2] != (c, c) or delta.shape[2] < 2:
            raise CalibrationFormatError(
                "shift_delta", f"expected shape (C, C, M) = ({c}, {c}, M>=2), got {delta.shape}"
            )
        if np.any(step <= 0):
            raise CalibrationFormatError("shift_step", "expected knot spacings > 0, got a value <= 0")
        eps_arr = get.float_array("eps", shape=())
        eps = float(eps_arr)
        if not 0.0 < eps < 0.5:
            raise CalibrationFormatError("eps", f"expected a value in (0, 0.5), got {eps}")
        shifts = ShiftTables(lo.astype(np.float32), step.astype(np.float32), delta.astype(np.float32))
        return cls(source, s_counts, target, t_counts, anchor_pos, anchor_neg, shifts, eps)


class _Fields:
    """Typed access to the fields of an array mapping (a dict or an open NpzFile)."""

    def __init__(self, arrays: object) -> None:
        self.arrays = arrays

    def raw(self, name: str) -> np.ndarray:
        try:
            value = self.arrays[name]  # type: ignore[index]
        except KeyError:
            raise CalibrationFormatError(name, "missing") from None
        return np.asarray(value)

    def float_array(
        self, name: str, shape: tuple[int, ...] | None = None, ndim: int | None = None
    ) -> np.ndarray:
        a = self.raw(name)
        want = f"shape {shape}" if shape is not None else f"{ndim} dimensions"
        if not np.issubdtype(a.dtype, np.floating):
            raise CalibrationFormatError(name, f"expected a float array of {want}, got dtype {a.dtype}")
        if (shape is not None and a.shape != shape) or (ndim is not None and a.ndim != ndim):
            raise CalibrationFormatError(name, f"expected a float array of {want}, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise CalibrationFormatError(name, "expected finite values, got NaN or inf")
        return a

    def int_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = self.raw(name)
        if not np.issubdtype(a.dtype, np.integer):
            raise CalibrationFormatError(name, f"expected an int array of shape {shape}, got dtype {a.dtype}")
        if a.shape != shape:
            raise CalibrationFormatError(name, f"expected an int array of shape {shape}, got shape {a.shape}")
        if np.any(a < 0):
            raise CalibrationFormatError(name, "expected counts >= 0, got a negative value")
        return a.astype(np.int64)

    def gmm(self, prefix: str, shape: tuple[int, ...]) -> Gmm:
        w = self.float_array(f"{prefix}_weights", shape=shape).astype(np.float64)
        m = self.float_array(f"{prefix}_means", shape=shape).astype(np.float64)
        s = self.float_array(f"{prefix}_stds", shape=shape).astype(np.float64)
        if np.any(w < 0) or not np.allclose(w.sum(axis=-1), 1.0, atol=1e-6):
            raise CalibrationFormatError(
                f"{prefix}_weights", "expected weights >= 0 summing to 1 over the last axis"
            )
        if np.any(s <= 0):
            raise CalibrationFormatError(f"{prefix}_stds", "expected stds > 0, got a value <= 0")
        return Gmm(w, m, s)


def build_calibration_tables(
    source: Gmm,
    source_counts: np.ndarray,
    target: Gmm | None = None,
    target_counts: np.ndarray | None = None,
    num_knots: int = 256,
    eps: float = 0.01,
) -> CalibrationTables:
    """Anchors pooled from the source pairs; shifts from the target pairs (source when none) to them."""
    if target is None:
        target, target_counts = source, source_counts
    if target_counts is None:
        raise ValueError("expected target_counts together with target")
    source_counts = np.asarray(source_counts, dtype=np.int64)
    target_counts = np.asarray(target_counts, dtype=np.int64)
    anchor_pos, anchor_neg = pool_mixtures(source, source_counts)
    shifts = build_shift_tables(target, anchor_pos, anchor_neg, target_counts, num_knots=num_knots, eps=eps)
    return CalibrationTables(
        source, source_counts, target, target_counts, anchor_pos, anchor_neg, shifts, float(eps)
    )


def positive_quantile(z: np.ndarray, cls: np.ndarray, tables: CalibrationTables) -> np.ndarray:
    """z (P,) winning logits, cls (P,) their classes -> F_ll(z) (P,) under the target positive pair of cls.

    With no drift this is uniform on [0, 1] for every class (probability integral transform).
    """
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    cls = np.asarray(cls).reshape(-1).astype(np.int64)
    if z.shape != cls.shape:
        raise ValueError(f"expected z and cls of the same shape, got {z.shape} and {cls.shape}")
    c = tables.num_classes
    if cls.size and (cls.min() < 0 or cls.max() >= c):
        raise ValueError(f"expected classes in [0, {c}), got values in [{cls.min()}, {cls.max()}]")
    t = tables.target
    g = Gmm(t.weights[cls, cls], t.means[cls, cls], t.stds[cls, cls])  # (P, K)
    return gmm_cdf(z[:, None], g)[:, 0]


def anchor_quantile(z: np.ndarray, tables: CalibrationTables) -> np.ndarray:
    """z (P,) -> F_p(z) (P,) under the source positive anchor (compares classes with each other)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    return gmm_cdf(z, tables.anchor_pos)


@dataclass(frozen=True)
class PitCheck:
    """The probability integral transform of held-out pixels under the tables' own positive pairs."""

    mean: np.ndarray  # (C,) mean of u = F_ll(z_l) over pixels of true class l; nan where none
    pixels: np.ndarray  # (C,) int64 pixels per class

    @property
    def deviation(self) -> float:
        """Mean |mean u − ½| over the classes present: 0 when the tables describe these logits."""
        present = self.pixels > 0
        return float(np.mean(np.abs(self.mean[present] - 0.5))) if present.any() else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "mean_u": [None if np.isnan(v) else round(float(v), 4) for v in self.mean],
            "pixels": [int(n) for n in self.pixels],
            "mean_abs_deviation": round(self.deviation, 4),
            "range": [
                round(float(np.nanmin(self.mean)), 4) if (self.pixels > 0).any() else None,
                round(float(np.nanmax(self.mean)), 4) if (self.pixels > 0).any() else None,
            ],
        }


def pit_check(
    logits: np.ndarray,  # (C, P) logits of labelled pixels
    labels: np.ndarray,  # (P,) true classes, IGNORE_INDEX skipped
    tables: CalibrationTables,
) -> PitCheck:
    """Per class l, the mean of u = F_ll(z_l) over pixels of true class l (≈ 0.5 for tables that describe
    these logits; high: the positive logits run above the tables, low: below)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    c = tables.num_classes
    if logits.ndim != 2 or logits.shape != (c, labels.size):
        raise ValueError(f"expected logits (C, P) = ({c}, {labels.size}), got {logits.shape}")
    valid = (labels >= 0) & (labels < c)
    cls = labels[valid].astype(np.int64)
    z = logits[:, valid][cls, np.arange(cls.size)]  # (V,) each pixel's own-class logit
    u = positive_quantile(z, cls, tables)
    pixels = np.bincount(cls, minlength=c)
    sums = np.bincount(cls, weights=u, minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(pixels > 0, sums / np.maximum(pixels, 1), np.nan)
    return PitCheck(mean, pixels.astype(np.int64))
