"""A pinhole camera over a flat street and a two-layer canvas (RGB and train ids) drawn with Pillow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from calibration.classes import TRAIN_ID

# Internal id for the ego vehicle's bonnet: written as Cityscapes label id 1 ("ego vehicle"), i.e. ignored.
EGO = 254
_LIMIT = 30000.0  # Pillow draws with C ints; far-off-screen vertices are clamped

Point = tuple[float, float]
Color = tuple[int, int, int]


@dataclass(frozen=True)
class Camera:
    """Camera at height `height` above a flat ground, looking along +z; x to the right, y up (metres)."""

    focal: float  # pixels
    height: float  # metres above the ground
    cx: float  # column of the vanishing point
    horizon: float  # row of the horizon

    def project(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (broadcastable arrays) -> pixel columns and rows."""
        u = self.cx + self.focal * x / z
        v = self.horizon + self.focal * (self.height - y) / z
        return u, v

    def points(self, xyz: Sequence[tuple[float, float, float]]) -> list[Point]:
        """A few world points -> pixel vertices, clamped for Pillow (plain floats: numpy costs more here)."""
        f, cx, hz, hc = self.focal, self.cx, self.horizon, self.height
        out = []
        for x, y, z in xyz:
            u = cx + f * x / z
            v = hz + f * (hc - y) / z
            out.append((min(max(u, -_LIMIT), _LIMIT), min(max(v, -_LIMIT), _LIMIT)))
        return out

    def scale(self, z: float) -> float:
        """Pixels per metre at depth z."""
        return self.focal / z


def jitter(rng: np.random.Generator, color: Sequence[float], std: float, factor: float = 1.0) -> Color:
    c = np.asarray(color, dtype=np.float64) * factor + rng.normal(0.0, std, 3)
    c = np.clip(c, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def shade(color: Color, factor: float) -> Color:
    return (
        int(min(255, color[0] * factor)),
        int(min(255, color[1] * factor)),
        int(min(255, color[2] * factor)),
    )


class Canvas:
    """Draws every primitive twice: its colour into the RGB layer and its class into the label layer."""

    def __init__(self, rgb: np.ndarray, fill_class: int) -> None:
        h, w, _ = rgb.shape
        self.height, self.width = h, w
        self.rgb = Image.fromarray(rgb)
        self.label = Image.new("L", (w, h), fill_class)
        self._rgb = ImageDraw.Draw(self.rgb)
        self._label = ImageDraw.Draw(self.label)

    def polygon(self, pts: Sequence[Point], cls: int, color: Color) -> None:
        self._rgb.polygon(pts, fill=color)
        self._label.polygon(pts, fill=cls)

    def ellipse(self, box: tuple[float, float, float, float], cls: int, color: Color) -> None:
        x0, y0, x1, y1 = box
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:  # Pillow rejects degenerate boxes; a pixel is enough
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            box = (cx - 0.5, cy - 0.5, cx + 0.5, cy + 0.5)
        self._rgb.ellipse(box, fill=color)
        self._label.ellipse(box, fill=cls)

    def ring(self, box: tuple[float, float, float, float], cls: int, color: Color, width: int) -> None:
        x0, y0, x1, y1 = box
        if x1 - x0 < 2.0 or y1 - y0 < 2.0:
            self.ellipse(box, cls, color)
            return
        self._rgb.ellipse(box, outline=color, width=width)
        self._label.ellipse(box, outline=cls, width=width)

    def line(self, pts: Sequence[Point], cls: int, color: Color, width: float) -> None:
        wi = max(1, round(width))
        self._rgb.line(list(pts), fill=color, width=wi)
        self._label.line(list(pts), fill=cls, width=wi)

    def paint(self, pts: Sequence[Point], color: Color) -> None:
        """Colour only (markings, windows, shadows): the class underneath stays."""
        self._rgb.polygon(pts, fill=color)

    def paint_line(self, pts: Sequence[Point], color: Color, width: float) -> None:
        self._rgb.line(list(pts), fill=color, width=max(1, round(width)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 colours, (H, W) uint8 train ids."""
        return np.asarray(self.rgb), np.asarray(self.label)


C = TRAIN_ID  # short alias for the drawing code
