"""Defect drawing and colour primitives shared by the demo dataset, the synthetic-anomaly
generators (:mod:`patchbank.synth`) and training-image augmentation.

Each ``draw_*`` function changes a float image in [0, 1] of shape (H, W, 3) **in place** around
``centre`` and returns the bool (H, W) mask of the pixels it drew. ``scale`` multiplies line
widths (1.0 at 256 px). Sizes are fractions of ``min(H, W)``, so on square images they are the
demo dataset's exact drawing code (its bytes are unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


def pixel_grid(height: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (height, width) float64 (square if no width)."""
    width = height if width is None else width
    return np.meshgrid(np.arange(height, dtype=np.float64) + 0.5,
                       np.arange(width, dtype=np.float64) + 0.5, indexing="ij")


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def blob_polygon(
    rng: np.random.Generator, centre: tuple[float, float], r0: float
) -> list[tuple[float, float]]:
    """Irregular closed outline around ``centre`` (smooth random radius, 48 vertices)."""
    angles = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    rad = np.ones_like(angles)
    for k in (2, 3, 5):
        rad += rng.uniform(0.0, 0.22 / k * 2) * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
    rad *= r0 * rng.uniform(0.7, 1.0)
    ax = rng.uniform(0.7, 1.0)  # slight ellipse
    rot = rng.uniform(0, math.pi)
    px, py = rad * np.cos(angles), ax * rad * np.sin(angles)
    xs = centre[0] + px * math.cos(rot) - py * math.sin(rot)
    ys = centre[1] + px * math.sin(rot) + py * math.cos(rot)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def polygon_mask(shape: tuple[int, int] | int, poly: list[tuple[float, float]]) -> np.ndarray:
    """Bool mask of a filled polygon on an (H, W) canvas (an int means square)."""
    h, w = (shape, shape) if isinstance(shape, int) else shape
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(poly, fill=255)
    return np.asarray(canvas) > 0


def draw_scratch(
    img: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """1-2 thin, slightly bent line segments, brighter or darker than the surface."""
    h, w = img.shape[:2]
    size = min(h, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.08, 0.25) * size
        ang = rng.uniform(0.0, math.pi)
        bend = rng.uniform(-0.25, 0.25)
        jitter = rng.uniform(-0.03, 0.03, size=2) * size
        pts = []
        for t in (-0.5, 0.0, 0.5):
            a = ang + bend * t * 2
            pts.append(
                (
                    centre[0] + jitter[0] + t * length * math.cos(a),
                    centre[1] + jitter[1] + t * length * math.sin(a),
                )
            )
        width = max(1, round(float(rng.choice([1.0, 2.0])) * scale))
        draw.line(pts, fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    delta = rng.uniform(0.12, 0.45) * (1.0 if rng.random() < 0.5 else -1.0)
    img[mask] += delta + rng.normal(0.0, 0.02, size=(int(mask.sum()), 3))
    return mask


def draw_hole(
    img: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """An irregular blob darkened towards its middle (the surface shows faintly through)."""
    h, w = img.shape[:2]
    size = min(h, w)
    r0 = max(rng.uniform(0.02, 0.055) * size, 3.0)
    mask = polygon_mask((h, w), blob_polygon(rng, centre, r0))
    y, x = pixel_grid(h, w)
    depth = smoothstep(0.0, r0, r0 - np.hypot(x - centre[0], y - centre[1]))  # 1 at centre
    keep = rng.uniform(0.15, 0.55) * (1.0 - 0.4 * depth)
    img[mask] *= keep[mask][:, None]
    return mask


STAIN_COLOURS = np.array(
    [[0.55, 0.22, 0.08], [0.20, 0.45, 0.12], [0.15, 0.22, 0.60], [0.80, 0.65, 0.05]]
)


def draw_stain(
    img: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """A translucent coloured blob, strongest in its middle."""
    h, w = img.shape[:2]
    size = min(h, w)
    r0 = max(rng.uniform(0.03, 0.07) * size, 4.0)
    mask = polygon_mask((h, w), blob_polygon(rng, centre, r0))
    soft = Image.fromarray((mask * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=r0 / 3)
    )
    inner = np.asarray(soft, dtype=np.float64) / 255.0
    alpha = rng.uniform(0.25, 0.6) * (0.55 + 0.45 * inner / max(inner.max(), 1e-6)) * mask
    colour = STAIN_COLOURS[int(rng.integers(len(STAIN_COLOURS)))]
    lum = img.mean(axis=2, keepdims=True)
    tinted = colour * (0.5 + 0.8 * lum)  # keeps some of the underlying structure
    img[:] = img * (1.0 - alpha[..., None]) + tinted * alpha[..., None]
    return mask


def pil_image(arr: np.ndarray) -> Image.Image:
    """uint8 (H, W) -> PIL "L", (H, W, 3) -> "RGB"."""
    return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")


def colour_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = 0.1
                  ) -> np.ndarray:
    """torchvision-style ColorJitter(brightness, contrast, saturation, hue = ``strength``) in a
    random order; grayscale patches get brightness and contrast only."""
    img = pil_image(patch)
    ops = ["brightness", "contrast"] + (["saturation", "hue"] if patch.ndim == 3 else [])
    for i in rng.permutation(len(ops)):
        op = ops[int(i)]
        if op == "hue":
            shift = rng.uniform(-strength, strength)
            hsv = np.array(img.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 255)) % 256
            img = Image.fromarray(hsv, mode="HSV").convert("RGB")
            continue
        factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                    "saturation": ImageEnhance.Color}[op]
        img = enhancer(img).enhance(factor)
    return np.asarray(img)


#: The demo dataset's RGB defects by name.
DRAWERS: dict[str, Callable[..., np.ndarray]] = {
    "hole": draw_hole,
    "scratch": draw_scratch,
    "stain": draw_stain,
}

__all__ = ["DRAWERS", "STAIN_COLOURS", "blob_polygon", "colour_jitter", "draw_hole",
           "draw_scratch", "draw_stain", "pil_image", "pixel_grid", "polygon_mask", "smoothstep"]
