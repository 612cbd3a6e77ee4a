"""Models as predictors: anything that maps uint8 images to logits (a torch network, or an ONNX bundle run
by onnxruntime, so a shipped bundle is evaluated without its torch weights), and the logits' upsampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.networks import normalise_images

# uint8 images (N, H, W, 3) -> float32 logits (N, C, h, w)
Predictor = Callable[[np.ndarray], np.ndarray]


class TorchPredictor:
    """Runs a torch segmentation network (eval mode, no grad) on uint8 images."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8
        x = torch.from_numpy(normalise_images(images)).to(self.device)
        with torch.no_grad():
            return self.model(x).logits.float().cpu().numpy()


class OnnxPredictor:
    """Runs an exported model.onnx with onnxruntime, normalising as its manifest says."""

    def __init__(
        self,
        model_path: str | Path,
        mean: Sequence[float],
        std: Sequence[float],
        pixel_scale: float = 255.0,
        threads: int = 2,
        input_name: str = "image",
        output_name: str = "logits",
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting between ops: on a shared machine spinning threads steal the cores they wait for.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.pixel_scale = np.float32(pixel_scale)
        self.input_name, self.output_name = input_name, output_name  # the manifest's graph names

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / self.pixel_scale  # (N, 3, H, W)
        x = np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)
        (logits,) = self.session.run([self.output_name], {self.input_name: x})
        return np.asarray(logits, dtype=np.float32)


class ResizingPredictor:
    """Resizes uint8 images (bilinear, as training does) before the model: to a fixed (H, W) as the
    service does with the manifest's input size, or by a factor as the training loop's evaluation does."""

    def __init__(
        self, inner: Predictor, size: tuple[int, int] | None = None, scale: float | None = None
    ) -> None:
        if (size is None) == (scale is None):
            raise ValueError("expected exactly one of size or scale")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale: expected > 0, got {scale}")
        self.inner = inner
        self.size = size
        self.scale = scale

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        assert self.scale is not None
        return max(1, round(height * self.scale)), max(1, round(width * self.scale))

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8
        from PIL import Image

        h, w = self.target_size(images.shape[1], images.shape[2])
        if (h, w) != images.shape[1:3]:
            images = np.stack(
                [np.asarray(Image.fromarray(i).resize((w, h), Image.Resampling.BILINEAR)) for i in images]
            )
        return self.inner(images)


def upsample_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, h, w) -> (N, C, H, W), bilinear with half-pixel centres (as the networks' own upsampling)."""
    if logits.shape[-2:] == size:
        return logits
    t = F.interpolate(torch.from_numpy(logits), size=size, mode="bilinear", align_corners=False)
    return t.numpy()


def model_input_size(predictor: Predictor, height: int, width: int) -> tuple[int, int]:
    """(H, W) the model sees for an (height, width) image: a ResizingPredictor's target, else the image's."""
    if isinstance(predictor, ResizingPredictor):
        return predictor.target_size(height, width)
    return height, width
