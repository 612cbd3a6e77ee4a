"""The live refit run offline: the traffic sample of image files, computed in-process by the service's
own stages (decode, the model's session, the decision size), sampled as the service samples requests."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from calibration.segmentation import DEFAULT_DECISION_SCALE, decision_size
from calibration.traffic import TrafficSample, sample_decision_pixels
from service.inference import ServedModel
from service.pipeline import decode


def sample_images(
    model: ServedModel,
    paths: Iterable[Path],
    pixels_per_image: int,
    seed: int = 0,
    decision_scale: float = DEFAULT_DECISION_SCALE,
    max_pixels: int = 4096 * 4096,
) -> TrafficSample:
    """(C, P) pixels of these images' logits at the decision size, ``pixels_per_image`` each."""
    rng = np.random.default_rng(seed)
    chunks = []
    for path in paths:
        size, image = decode(model, Path(path).read_bytes(), max_pixels)
        logits = model.run(image)[0]  # (C, h, w)
        out = decision_size(size, model.input_size(*size), decision_scale)
        chunks.append(sample_decision_pixels(logits, out, pixels_per_image, rng))
    if not chunks:
        raise ValueError("expected at least one image to sample, got none")
    now = time.time()
    return TrafficSample(np.concatenate(chunks, axis=1), now, now, len(chunks))
