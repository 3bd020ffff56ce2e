"""Seeded synthetic-anomaly generators: paste a defect into a defect-free image, return its mask.

Every generator has the signature ``(image, rng, **opts) -> (image, mask)``: ``image`` is uint8
(H, W, 3) RGB or (H, W) grayscale and is not modified; the result has the same shape and dtype,
``mask`` is bool (H, W). Pixels outside the mask are exactly the input's; the mask is the
region the defect covers (a few pixels inside it can keep their value by coincidence, e.g. a
patch pasted onto a uniform background). All randomness comes from ``rng``, so the same seed
gives identical bytes.

- ``cutpaste`` / ``scar``: CutPaste (Li et al., CVPR 2021, arXiv 2104.04015): a rectangle of
  2-15 % of the image area with aspect ratio in [0.3, 3.3] (log-uniform), or a thin "scar"
  (2-16 x 10-25 px at 256 px, rotated by -45..45 degrees), cut from the same image, colour
  jittered (brightness, contrast, saturation, hue 0.1) and pasted at a random location.
- ``perlin``: DRAEM (Zavrtanik et al., ICCV 2021, arXiv 2108.07610): Perlin noise with
  2^0..2^5 cells per axis at 256x256, rotated by -90..90 degrees, thresholded at 0.5; the
  masked area is replaced by ``beta * image + (1 - beta) * texture`` with ``beta`` in
  [0, 0.8]. The texture is ``source`` (e.g. another normal training image; DTD is not
  available offline) after 3 of DRAEM's 10 colour/geometry augmenters, or a procedural
  fractal-noise texture when no source is given.
- ``scratch``, ``hole``, ``stain``: the demo dataset's defects
  (:mod:`patchbank.data.shapes`) placed anywhere 15-85 % across the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from patchbank.core.errors import PatchbankError
from patchbank.data.shapes import DRAWERS, colour_jitter, pil_image

Generator = Callable[..., tuple[np.ndarray, np.ndarray]]

#: DRAEM works on images resized to 256 x 256; its noise and CutPaste's scar sizes are at 256 px.
WORK_SIZE = 256


def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                           and image.shape[2] == 3)):
        raise PatchbankError(f"synthetic anomalies need a uint8 (H, W) or (H, W, 3) image, got "
                             f"{image.dtype} {image.shape}; convert it with PIL first")
    if min(image.shape[:2]) < 16:
        raise PatchbankError(f"image of {image.shape[1]}x{image.shape[0]} px is too small for "
                             "synthetic anomalies (need at least 16 px per side)")
    return image


def _composite(image: np.ndarray, changed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``changed`` inside ``mask``, ``image`` (byte for byte) outside."""
    out = image.copy()
    out[mask] = changed[mask]
    return out


# --------------------------------------------------------------------------- CutPaste


def cutpaste(image: np.ndarray, rng: np.random.Generator, *,
             area_ratio: tuple[float, float] = (0.02, 0.15), aspect_ratio: float = 0.3,
             jitter: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a jittered rectangle of the image pasted elsewhere in it."""
    image = _check(image)
    h, w = image.shape[:2]
    area = rng.uniform(*area_ratio) * h * w
    log_ratio = (math.log(aspect_ratio), math.log(1 / aspect_ratio))
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(np.clip(round(math.sqrt(area * aspect)), 1, w - 1))
    ch = int(np.clip(round(math.sqrt(area / aspect)), 1, h - 1))
    fy, fx = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    patch = colour_jitter(image[fy:fy + ch, fx:fx + cw], rng, jitter)
    ty, tx = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    changed = image.copy()
    changed[ty:ty + ch, tx:tx + cw] = patch
    mask = np.zeros((h, w), dtype=bool)
    mask[ty:ty + ch, tx:tx + cw] = True
    return _composite(image, changed, mask), mask


def cutpaste_scar(image: np.ndarray, rng: np.random.Generator, *,
                  width: tuple[float, float] = (2, 16), height: tuple[float, float] = (10, 25),
                  rotation: tuple[float, float] = (-45, 45), jitter: float = 0.1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-scar: a thin jittered strip of the image, rotated, pasted elsewhere.

    ``width``/``height`` are pixels at 256 px and scale with ``min(H, W) / 256``.
    """
    image = _check(image)
    h, w = image.shape[:2]
    scale = min(h, w) / WORK_SIZE
    sw = max(1, min(w - 1, round(rng.uniform(*width) * scale)))
    sh = max(1, min(h - 1, round(rng.uniform(*height) * scale)))
    fy, fx = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
    patch = pil_image(colour_jitter(image[fy:fy + sh, fx:fx + sw], rng, jitter))
    angle = rng.uniform(*rotation)
    # rotate the strip and an all-255 alpha with it (nearest: the alpha stays exact)
    rotated = patch.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
    alpha = Image.new("L", patch.size, 255).rotate(angle, resample=Image.Resampling.NEAREST,
                                                   expand=True)
    pw, ph = rotated.size
    pw, ph = min(pw, w), min(ph, h)
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    mask = np.zeros((h, w), dtype=bool)
    mask[ty:ty + ph, tx:tx + pw] = np.asarray(alpha)[:ph, :pw] > 0
    changed = image.copy()
    changed[ty:ty + ph, tx:tx + pw] = np.asarray(rotated)[:ph, :pw]
    return _composite(image, changed, mask), mask


# --------------------------------------------------------------------------- DRAEM / Perlin


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
                 ) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` cells per axis (``shape`` must be
    a multiple of ``res``); values in about [-0.7, 0.7]. Quintic fade, random unit gradients."""
    (h, w), (ry, rx) = shape, res
    if h % ry or w % rx:
        raise ValueError(f"shape {shape} must be a multiple of res {res}")
    angles = rng.uniform(0.0, 2 * math.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = (np.arange(h) + 0.0) * ry / h
    x = (np.arange(w) + 0.0) * rx / w
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(yf), fade(xf)
    top = dot(0, 0) + v * (dot(0, 1) - dot(0, 0))
    bottom = dot(1, 0) + v * (dot(1, 1) - dot(1, 0))
    return math.sqrt(2) * (top + u * (bottom - top))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, *,
                scale: tuple[int, int] = (0, 6), threshold: float = 0.5,
                rotation: tuple[float, float] = (-90, 90)) -> np.ndarray:
    """DRAEM's anomaly mask: thresholded, rotated Perlin noise made at 256 x 256 (2^a x 2^b
    cells, a, b in ``[scale[0], scale[1])``), resized to ``shape`` (nearest)."""
    ry, rx = (2 ** int(rng.integers(*scale)) for _ in range(2))
    noise = perlin_noise((WORK_SIZE, WORK_SIZE), (ry, rx), rng).astype(np.float32)
    noise_img = Image.fromarray(noise, mode="F").rotate(
        rng.uniform(*rotation), resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    binary = Image.fromarray(((np.asarray(noise_img) > threshold) * 255).astype(np.uint8))
    return np.asarray(binary.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 0


def _draem_augment(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3 distinct ops of DRAEM's 10 source-image augmenters (gamma contrast, brightness,
    sharpness, hue/saturation, solarize, posterize, invert, autocontrast, equalize, rotate)."""
    img = pil_image(src)
    for i in rng.choice(10, size=3, replace=False):
        i = int(i)
        if i == 0:  # GammaContrast((0.5, 2.0), per_channel)
            arr = np.asarray(img).astype(np.float64) / 255.0
            gam = rng.uniform(0.5, 2.0, size=(1, 1, arr.shape[2]) if arr.ndim == 3 else 1)
            img = pil_image(np.rint(255.0 * arr**gam).astype(np.uint8))
        elif i == 1:  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))
            arr = np.asarray(img).astype(np.float64) * rng.uniform(0.8, 1.2) \
                + rng.uniform(-30, 30)
            img = pil_image(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        elif i == 2:  # EnhanceSharpness
            img = ImageEnhance.Sharpness(img).enhance(rng.uniform(0.0, 2.0))
        elif i == 3:  # AddToHueAndSaturation((-50, 50), per_channel)
            if img.mode == "RGB":
                hsv = np.asarray(img.convert("HSV")).astype(np.int16)
                hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
                hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
                img = Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")
        elif i == 4:  # Solarize(threshold=(32, 128))
            img = ImageOps.solarize(img, threshold=int(rng.integers(32, 129)))
        elif i == 5:  # Posterize
            img = ImageOps.posterize(img, int(rng.integers(1, 9)))
        elif i == 6:
            img = ImageOps.invert(img)
        elif i == 7:
            img = ImageOps.autocontrast(img)
        elif i == 8:
            img = ImageOps.equalize(img)
        else:  # Affine(rotate=(-45, 45))
            img = img.rotate(rng.uniform(-45, 45), resample=Image.Resampling.BILINEAR)
    return np.asarray(img)


def procedural_texture(shape: tuple[int, int], channels: int, rng: np.random.Generator
                       ) -> np.ndarray:
    """A random colourful texture (fractal Perlin noise per channel, random stripes): the
    stand-in for DRAEM's DTD images. uint8 (H, W) or (H, W, 3)."""
    layers = []
    for _ in range(channels):
        acc = np.zeros((WORK_SIZE, WORK_SIZE))
        for octave in range(int(rng.integers(1, 4)), 6):
            acc += perlin_noise((WORK_SIZE, WORK_SIZE), (2**octave, 2**octave), rng) \
                * 0.6 ** octave
        freq, phase = rng.uniform(4, 40), rng.uniform(0, 2 * math.pi)
        theta = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:WORK_SIZE, 0:WORK_SIZE] / WORK_SIZE
        acc += rng.uniform(0, 0.3) * np.sin(
            2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        acc = (acc - acc.min()) / max(float(np.ptp(acc)), 1e-9)
        layers.append(np.rint(255 * acc).astype(np.uint8))
    tex = np.stack(layers, axis=-1) if channels == 3 else layers[0]
    return np.asarray(pil_image(tex).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _as_source(source: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``source`` converted to ``image``'s mode and resized to its size."""
    src = np.asarray(source)
    if src.dtype != np.uint8 or src.ndim not in (2, 3):
        raise PatchbankError(f"perlin source must be a uint8 image, got {src.dtype} {src.shape}")
    pil = Image.fromarray(src)
    pil = pil.convert("L" if image.ndim == 2 else "RGB")
    return np.asarray(pil.resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR))


def perlin(image: np.ndarray, rng: np.random.Generator, *, source: np.ndarray | None = None,
           beta: tuple[float, float] = (0.0, 0.8), threshold: float = 0.5,
           scale: tuple[int, int] = (0, 6), min_area: float = 0.005, max_area: float = 0.5,
           tries: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM: a Perlin-noise-shaped region blended with a texture (``source`` or procedural).

    Masks covering less than ``min_area`` or more than ``max_area`` of the image are redrawn
    (DRAEM keeps empty ones as normal samples; a validation defect must exist).
    """
    image = _check(image)
    h, w = image.shape[:2]
    for _ in range(tries):
        mask = perlin_mask((h, w), rng, scale=scale, threshold=threshold)
        if min_area <= mask.mean() <= max_area:
            break
    else:
        raise PatchbankError(f"no Perlin mask covering {min_area:.1%}-{max_area:.1%} of the "
                             f"image in {tries} tries; widen min_area/max_area")
    channels = 1 if image.ndim == 2 else 3
    tex = (_as_source(source, image) if source is not None
           else procedural_texture((h, w), channels, rng))
    tex = _draem_augment(tex, rng).astype(np.float64)
    b = rng.uniform(*beta)
    blended = np.clip(np.rint(b * image.astype(np.float64) + (1 - b) * tex), 0, 255)
    return _composite(image, blended.astype(np.uint8), mask), mask


# --------------------------------------------------------------------------- demo defects


def _demo(kind: str) -> Generator:
    draw = DRAWERS[kind]

    def generate(image: np.ndarray, rng: np.random.Generator, *,
                 margin: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
        image = _check(image)
        h, w = image.shape[:2]
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        canvas = rgb.astype(np.float64) / 255.0
        cx, cy = rng.uniform(margin, 1 - margin) * w, rng.uniform(margin, 1 - margin) * h
        mask = draw(canvas, rng, (float(cx), float(cy)), min(h, w) / WORK_SIZE)
        if image.ndim == 2:
            canvas = canvas.mean(axis=2)
        changed = np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
        return _composite(image, changed, mask), mask

    generate.__name__ = kind
    generate.__doc__ = f"The demo dataset's {kind} (:func:`patchbank.data.shapes.draw_{kind}`)."
    return generate


scratch = _demo("scratch")
hole = _demo("hole")
stain = _demo("stain")

#: Every generator by name (the defect type folders of a synthetic set).
GENERATORS: dict[str, Generator] = {
    "cutpaste": cutpaste,
    "scar": cutpaste_scar,
    "perlin": perlin,
    "scratch": scratch,
    "hole": hole,
    "stain": stain,
}


def generate(kind: str, image: np.ndarray, rng: np.random.Generator, **opts: Any
             ) -> tuple[np.ndarray, np.ndarray]:
    """Run the generator ``kind`` (a key of :data:`GENERATORS`)."""
    if kind not in GENERATORS:
        raise PatchbankError(f"unknown synthetic anomaly {kind!r}; choose from "
                             f"{', '.join(GENERATORS)}")
    return GENERATORS[kind](image, rng, **opts)
