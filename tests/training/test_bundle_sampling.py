"""`blda bundle create` samples logits at label resolution without torch: its bilinear sampling must equal
the exporter's torch upsampling (training.evaluation.predictors.upsample_logits) at the sampled pixels."""

from __future__ import annotations

import numpy as np
import pytest

from service.bundling import sample_bilinear
from training.evaluation.predictors import upsample_logits


@pytest.mark.parametrize(
    ("small", "big"), [((5, 7), (20, 28)), ((6, 9), (23, 37)), ((8, 8), (8, 8)), ((4, 6), (3, 5))]
)
def test_sampled_bilinear_equals_torch_upsampling(small: tuple[int, int], big: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, *small)).astype(np.float32)  # (C, h, w)
    full = upsample_logits(logits[None], big)[0]  # (C, H, W) the reference
    rows, cols = np.divmod(rng.choice(big[0] * big[1], min(50, big[0] * big[1]), replace=False), big[1])
    np.testing.assert_allclose(sample_bilinear(logits, rows, cols, big), full[:, rows, cols], atol=1e-5)
