"""Sessions (the CUDA check), bundle validation by running, and the decision functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from service_helpers import manifest, random_tables, tiny_model

from calibration.alignment import calibrated_decision
from calibration.bundle import BundleError, save_bundle
from calibration.segmentation import upsample_bilinear
from service import inference
from service.inference import create_session, load_served_model, raw_decision
from service.pipeline import SegmentOptions, decide_for


class FakeSession:
    """Stands in for onnxruntime.InferenceSession: 'runs' on CUDA only when `cuda_works`."""

    cuda_works = False
    created: ClassVar[list[list[str]]] = []

    def __init__(self, path: str, sess_options: Any = None, providers: list[str] | None = None) -> None:
        self.requested = list(providers or [])
        FakeSession.created.append(self.requested)

    def get_providers(self) -> list[str]:
        usable = [p for p in self.requested if p != inference.CUDA or FakeSession.cuda_works]
        return usable or [inference.CPU]


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> type[FakeSession]:
    FakeSession.created = []
    monkeypatch.setattr(inference.ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(inference.ort, "get_available_providers", lambda: [inference.CUDA, inference.CPU])
    monkeypatch.setattr(inference, "_cuda_usable", {})
    return FakeSession


def test_listed_but_unusable_cuda_falls_back_to_the_cpu(fake_ort: type[FakeSession]) -> None:
    fake_ort.cuda_works = False
    _, providers = create_session(Path("m.onnx"), threads=2)
    assert providers == (inference.CPU,)
    _, again = create_session(Path("m.onnx"), threads=2)
    assert again == (inference.CPU,)
    # Probed once: the second session does not try CUDA again.
    assert fake_ort.created == [[inference.CUDA, inference.CPU], [inference.CPU], [inference.CPU]]


def test_cuda_is_used_when_it_really_runs(fake_ort: type[FakeSession]) -> None:
    fake_ort.cuda_works = True
    _, providers = create_session(Path("m.onnx"), threads=2)
    assert providers == (inference.CUDA, inference.CPU)
    _, cpu_only = create_session(Path("m.onnx"), threads=2, provider="cpu")
    assert cpu_only == (inference.CPU,)


def test_a_model_that_disagrees_with_its_manifest_fails_at_load(tmp_path: Path) -> None:
    wrong_classes = save_bundle(tmp_path, tiny_model(0, num_classes=19), None, manifest("a", "1", 18, False))
    with pytest.raises(BundleError, match=r"expected logits \(1, 18, h, w\).*got \(1, 19,"):
        load_served_model(wrong_classes, threads=1)
    wrong_input = save_bundle(
        tmp_path, tiny_model(0, input_name="pixels"), None, manifest("b", "1", calibrated=False)
    )
    with pytest.raises(BundleError, match="expected an input 'image'") as err:
        load_served_model(wrong_input, threads=1)
    assert err.value.field == "input.name"
    # The same graph loads and runs once the manifest records its input name.
    plain = manifest("e", "1", calibrated=False)
    named = plain.model_copy(update={"input": plain.input.model_copy(update={"name": "pixels"})})
    served = load_served_model(save_bundle(tmp_path, tiny_model(0, input_name="pixels"), None, named), 1)
    assert served.run(np.zeros((1, 3, 16, 16), np.float32)).shape == (1, 19, 4, 4)
    not_onnx = save_bundle(tmp_path, b"\x08\x01garbage", None, manifest("c", "1", calibrated=False))
    with pytest.raises(BundleError, match="expected an ONNX model onnxruntime can load"):
        load_served_model(not_onnx, threads=1)


def test_the_served_decisions(tmp_path: Path) -> None:
    tables = random_tables(3)
    model = load_served_model(save_bundle(tmp_path, tiny_model(1), tables, manifest("d", "1")), threads=1)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (19, 12, 20)).astype(np.float32)
    raw, winning = raw_decision(logits)
    assert raw.dtype == np.uint8 and np.array_equal(raw, logits.argmax(0))
    for i in range(12):
        for j in range(20):
            assert winning[i, j] == logits[raw[i, j], i, j] == logits[:, i, j].max()
    # The pipeline's decision of a (40, 70) image: input (40, 72), so decided at the image's size on the
    # upsampled logits, band by band.
    opts = SegmentOptions(calibrate=True, tau=0.7, band_pixels=37 * 70)
    decision = decide_for(model, logits, (40, 70), opts)
    assert decision.calibrated is not None and decision.calibrated.dtype == np.uint8
    up = upsample_bilinear(logits, (40, 70))
    assert np.array_equal(decision.calibrated, calibrated_decision(up, tables.shifts, tau=0.7))
    assert np.array_equal(decision.raw, up.argmax(0))
    assert model.calibrate_default and model.tau_default == 0.2
    assert model.input_size(100, 150) == (104, 152)  # multiple_of = 8
