"""The candidate version in shadow: decided on the same logits as the active version, never served.

The candidate of a recalibration is the same ``model.onnx`` with other tables, so its decision needs no
second forward pass: for a sampled ``shadow_fraction`` of calibrated requests, the calibrated rule runs
again on the request's logits with the shadow version's tables (a version whose model file differs is
not shadowed: its logits would differ). Per request, for both roles (``active``, ``shadow``): pixels per
class, the PIT of each role's winning logit under its own positive pair (u = F_ll(z_l), uniform when the
tables describe the traffic), and the pixels where the two decisions differ. Pixels are counted at the
input resolution, as service.telemetry does (each decision pixel weighted by the image pixels it becomes).

Prometheus (sums across workers and replicas; ratios in deploy/prometheus/rules):
``blda_shadow_pixels_total{model, version, role, class}``,
``blda_shadow_quantile{model, version, role, class}`` (histogram, buckets 0.1 .. 1.0),
``blda_shadow_flipped_pixels_total{model, version, shadow_version}`` and
``blda_shadow_compared_pixels_total{model, version, shadow_version}`` (``version`` = the active one).

Feedback: the shadow decision of a shadowed request is kept in the shared state (as the served one is,
for the feedback TTL); a ground truth for that request then scores both roles:
``blda_shadow_feedback_{correct,predicted,true}_pixels_total{model, version, role, class}``, whose
per-class IoU is correct / (predicted + true - correct).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from calibration.bias import confusion_matrix, iou_from_confusion
from calibration.bundle import MODEL_FILE
from calibration.labels import IGNORE_INDEX
from calibration.segmentation import decide, resize_nearest
from calibration.tables import CalibrationTables, positive_quantile
from service.feedback import FeedbackSettings, ServedPrediction, compress_mask, decompress_mask
from service.inference import ServedModel
from service.recalibration.choice import ServingChoice, choice_path, read_choice
from service.recalibration.settings import RecalibrationSettings
from service.records import SegmentationRecord
from service.registry import ModelRegistry, RegistryError
from service.state import StateError, StateStore
from service.telemetry import (
    QUANTILE_BUCKETS,
    add_histogram_counts,
    bucket_counts,
    class_pixels,
    pixel_weights,
)

ROLES = ("active", "shadow")


@dataclass(frozen=True)
class RoleStats:
    pixels: np.ndarray  # (C,) int64 input pixels per decided class
    quantile_counts: np.ndarray  # (C, B + 1) weighted PIT bucket counts, non-cumulative
    quantile_sums: np.ndarray  # (C,) weighted sums of u


@dataclass(frozen=True)
class ShadowStats:
    active: RoleStats
    shadow: RoleStats
    flipped: int  # input pixels whose class differs between the two decisions
    compared: int  # input pixels compared


def role_stats(
    decision: np.ndarray,  # (h, w) uint8 classes
    winning: np.ndarray,  # (h, w) float32 logit of each pixel's class
    tables: CalibrationTables,
    weights: np.ndarray,  # (h, w) input pixels per decision pixel
) -> RoleStats:
    c = tables.num_classes
    u = positive_quantile(winning.ravel(), decision.ravel(), tables)  # (h*w,)
    counts, sums = bucket_counts(u, decision.ravel(), weights.ravel().astype(np.float64), QUANTILE_BUCKETS, c)
    return RoleStats(class_pixels(decision, weights, c), counts, sums)


def shadow_stats(
    active: tuple[np.ndarray, np.ndarray, CalibrationTables],  # decision (h, w), winning logits, tables
    shadow: tuple[np.ndarray, np.ndarray, CalibrationTables],
    input_size: tuple[int, int],
) -> ShadowStats:
    weights = pixel_weights(active[0].shape, input_size)  # (h, w)
    flipped = int(weights[active[0] != shadow[0]].sum())
    return ShadowStats(
        role_stats(*active, weights), role_stats(*shadow, weights), flipped, int(weights.sum())
    )


def feedback_counts(
    decision: np.ndarray,  # (h, w) uint8
    truth: np.ndarray,  # (H, W) uint8 class ids, IGNORE_INDEX skipped
    num_classes: int,
) -> np.ndarray:
    """(C, C) int64 confusion [true, predicted] of the decision resized to the truth as served."""
    return confusion_matrix(resize_nearest(decision, *truth.shape), truth, num_classes, IGNORE_INDEX)


_SHADOW_DECISION = "shadow/decision/"


def _same_network(a: ServedModel, b: ServedModel) -> bool:
    return a.bundle.manifest.files.get(MODEL_FILE) == b.bundle.manifest.files.get(MODEL_FILE)


class ChoiceCache:
    """serving.json per model, read again only when the file changed (one stat per call)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._seen: dict[str, tuple[float, ServingChoice]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ServingChoice:
        try:
            mtime = choice_path(self.models_dir, name).stat().st_mtime_ns
        except FileNotFoundError:
            return ServingChoice()
        with self._lock:
            seen = self._seen.get(name)
            if seen is not None and seen[0] == mtime:
                return seen[1]
        choice = read_choice(self.models_dir, name)
        with self._lock:
            self._seen[name] = (mtime, choice)
        return choice


@dataclass
class _Totals:
    """This process's running sums for ``GET /v1/models/{name}/bias``."""

    classes: list[str]
    pixels: dict[str, np.ndarray]  # role -> (C,)
    quantile_sums: dict[str, np.ndarray]  # role -> (C,)
    flipped: int = 0
    compared: int = 0
    requests: int = 0
    feedback: dict[str, np.ndarray] | None = None  # role -> (C, C) confusion of feedback images
    feedback_images: int = 0


class ShadowMonitor:
    """Decides shadowed requests with the shadow version's tables and exports both roles' figures."""

    def __init__(
        self,
        registry: ModelRegistry,
        models_dir: Path,
        settings: RecalibrationSettings,
        metrics_registry: CollectorRegistry,
        random: Callable[[], float] | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.registry = registry
        self.store = store  # where shadow decisions wait for feedback (None: feedback not scored)
        self.feedback_ttl_s = FeedbackSettings().ttl_s
        self.choices = ChoiceCache(models_dir)
        self.settings = settings
        rng = np.random.default_rng()
        self._random = random if random is not None else rng.random
        labels = ["model", "version", "role", "class"]
        self.pixels = Counter(
            "blda_shadow_pixels",
            "Input pixels per decided class of shadowed requests, by role",
            labels,
            registry=metrics_registry,
        )
        self.quantile = Histogram(
            "blda_shadow_quantile",
            "PIT u = F_ll(z_l) of the winning logit under each role's own tables (shadowed requests)",
            labels,
            buckets=QUANTILE_BUCKETS,
            registry=metrics_registry,
        )
        pair = ["model", "version", "shadow_version"]
        self.flipped = Counter(
            "blda_shadow_flipped_pixels",
            "Input pixels whose class differs between active and shadow",
            pair,
            registry=metrics_registry,
        )
        self.compared = Counter(
            "blda_shadow_compared_pixels",
            "Input pixels of shadowed requests",
            pair,
            registry=metrics_registry,
        )
        self.feedback_correct, self.feedback_predicted, self.feedback_true = (
            Counter(f"blda_shadow_feedback_{kind}_pixels", f"Feedback pixels of shadowed requests: {what}, by role",
                    labels, registry=metrics_registry)
            for kind, what in (("correct", "correctly decided"), ("predicted", "decided as the class"),
                               ("true", "of the true class"))
        )  # fmt: skip
        self.totals: dict[tuple[str, str, str], _Totals] = {}  # (model, active, shadow)
        self._lock = threading.Lock()

    def _models(self, record: SegmentationRecord) -> tuple[ServedModel, ServedModel] | None:
        """(active, shadow) when the record's model has a loaded shadow of the same network."""
        shadow = self.choices.get(record.model_name).shadow
        if shadow is None or shadow == record.model_version:
            return None
        try:
            versions = self.registry.get(record.model_name).versions
        except RegistryError:
            return None
        active_state, shadow_state = versions.get(record.model_version), versions.get(shadow)
        if active_state is None or shadow_state is None or active_state.model is None:
            return None
        candidate = shadow_state.model
        if (
            candidate is None
            or candidate.bundle.tables is None
            or not _same_network(active_state.model, candidate)
        ):
            return None
        return active_state.model, candidate

    def observe(self, record: SegmentationRecord) -> None:
        """A segmentation observer (on the worker pool, after the response)."""
        if not record.calibrate or record.calibrated_decision is None or record.tables is None:
            return
        # The candidate differs from the active version by its BLDA tables only: a request served by
        # another calibrator (an offset rule) would compare two different rules, not two table sets.
        if record.calibrator_name != "blda":
            return
        if record.calibrated_logits is None:
            return
        models = self._models(record)
        if models is None or self._random() >= self.settings.shadow_fraction:
            return
        active, candidate = models
        assert candidate.bundle.tables is not None
        size = (int(record.calibrated_decision.shape[0]), int(record.calibrated_decision.shape[1]))
        made = decide(np.asarray(record.logits), size, candidate.bundle.tables.shifts, (record.tau,))
        stats = shadow_stats(
            (record.calibrated_decision, record.calibrated_logits, record.tables),
            (made.calibrated[0], made.calibrated_logit[0], candidate.bundle.tables),
            record.input_size,
        )
        self.export(
            record.model_name,
            record.model_version,
            candidate.version,
            stats,
            active.bundle.manifest.class_names,
        )
        self._keep_for_feedback(record.request_id, candidate.version, made.calibrated[0])

    def _keep_for_feedback(self, request_id: str, version: str, decision: np.ndarray) -> None:
        if self.store is None:
            return
        head = json.dumps({"version": version, "shape": list(decision.shape)}).encode()
        with contextlib.suppress(StateError):  # feedback scoring is secondary: serving goes on
            self.store.put(
                _SHADOW_DECISION + request_id, head + b"\0" + compress_mask(decision), self.feedback_ttl_s
            )

    def observe_feedback(self, prediction: ServedPrediction, truth: np.ndarray) -> None:
        """A ground truth for a served request: score both roles when the request was shadowed."""
        if self.store is None or prediction.calibrated is None:
            return
        try:
            data = self.store.take(_SHADOW_DECISION + prediction.request_id)
        except StateError:
            return
        if data is None:
            return
        head_bytes, _, body = data.partition(b"\0")
        head = json.loads(head_bytes)
        shadow = decompress_mask(body, (int(head["shape"][0]), int(head["shape"][1])))
        _, active = prediction.decisions()
        assert active is not None
        c = prediction.num_classes
        confusion = {"active": feedback_counts(active, truth, c), "shadow": feedback_counts(shadow, truth, c)}
        name = prediction.model_name
        versions = {"active": prediction.model_version, "shadow": str(head["version"])}
        with self._lock:
            totals = self.totals.get((name, versions["active"], versions["shadow"]))
        classes = totals.classes if totals is not None else [str(k) for k in range(c)]
        for role in ROLES:
            conf = confusion[role]
            counts = ((self.feedback_correct, np.diag(conf)), (self.feedback_predicted, conf.sum(0)),
                      (self.feedback_true, conf.sum(1)))  # fmt: skip
            for k, class_name in enumerate(classes):
                for counter, values in counts:
                    if values[k]:
                        counter.labels(name, versions[role], role, class_name).inc(float(values[k]))
        if totals is None:
            return
        with self._lock:
            if totals.feedback is None:
                totals.feedback = {role: np.zeros((c, c), np.int64) for role in ROLES}
            for role in ROLES:
                totals.feedback[role] += confusion[role]
            totals.feedback_images += 1

    def export(self, name: str, active: str, shadow: str, stats: ShadowStats, classes: Sequence[str]) -> None:
        """Add one shadowed request's figures to the metrics and this process's totals."""
        for role, version, figures in (("active", active, stats.active), ("shadow", shadow, stats.shadow)):
            for c, class_name in enumerate(classes):
                if figures.pixels[c]:
                    self.pixels.labels(name, version, role, class_name).inc(float(figures.pixels[c]))
                if figures.quantile_counts[c].any():
                    child = self.quantile.labels(name, version, role, class_name)
                    add_histogram_counts(child, figures.quantile_counts[c], float(figures.quantile_sums[c]))
        self.flipped.labels(name, active, shadow).inc(stats.flipped)
        self.compared.labels(name, active, shadow).inc(stats.compared)
        with self._lock:
            key = (name, active, shadow)
            totals = self.totals.get(key)
            if totals is None:
                zeros = np.zeros(len(classes))
                totals = _Totals(
                    list(classes), {r: zeros.copy() for r in ROLES}, {r: zeros.copy() for r in ROLES}
                )
                self.totals[key] = totals
            for role, figures in (("active", stats.active), ("shadow", stats.shadow)):
                totals.pixels[role] += figures.pixels
                totals.quantile_sums[role] += figures.quantile_sums
            totals.flipped += stats.flipped
            totals.compared += stats.compared
            totals.requests += 1

    def report(self, name: str) -> list[dict[str, Any]]:
        """This process's shadow figures for ``name``: per (active, shadow) pair, per role, the class
        shares, the mean PIT u per class and its mean |u - 1/2| (the PIT deviation), and the flip rate."""
        out = []
        with self._lock:
            items = [(k, v) for k, v in sorted(self.totals.items()) if k[0] == name]
            for (_, active, shadow), totals in items:
                classes = totals.classes
                roles: dict[str, Any] = {}
                for role in ROLES:
                    pixels = totals.pixels[role]
                    total = pixels.sum()
                    present = pixels > 0
                    mean_u = np.where(present, totals.quantile_sums[role] / np.maximum(pixels, 1), np.nan)
                    roles[role] = {
                        "version": active if role == "active" else shadow,
                        "share": {
                            n: float(p / total) if total else 0.0
                            for n, p in zip(classes, pixels, strict=True)
                        },
                        "mean_u": {
                            n: None if np.isnan(m) else round(float(m), 4)
                            for n, m in zip(classes, mean_u, strict=True)
                        },
                        "pit_deviation": float(np.mean(np.abs(mean_u[present] - 0.5)))
                        if present.any()
                        else None,
                    }
                    if totals.feedback is not None:
                        iou = iou_from_confusion(totals.feedback[role])
                        roles[role]["feedback_iou"] = {
                            n: None if np.isnan(v) else round(float(v), 4)
                            for n, v in zip(classes, iou, strict=True)
                        }
                        roles[role]["feedback_miou"] = (
                            float(np.nanmean(iou)) if np.isfinite(iou).any() else None
                        )
                out.append(
                    {
                        "active": active,
                        "shadow": shadow,
                        "requests": totals.requests,
                        "feedback_images": totals.feedback_images,
                        "flip_rate": totals.flipped / totals.compared if totals.compared else None,
                        "roles": roles,
                    }
                )
        return out
