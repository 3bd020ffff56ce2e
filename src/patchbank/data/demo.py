"""Embedded demo dataset: a small, seeded, procedurally generated MVTec AD-layout dataset.

Two categories, ``demo_texture`` (a woven, carpet-like periodic pattern) and ``demo_object``
(a bottle top seen from above on a dark background), each with three defect types and exact
masks: ``scratch`` (thin bright/dark line segments), ``hole`` (a dark blob) and ``stain``
(a coloured smooth blob). Uses numpy and PIL only; the same parameters give identical bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

GENERATOR = "patchbank.data.demo"
GENERATOR_VERSION = 1
MANIFEST = "demo.json"
CATEGORIES: tuple[str, ...] = ("demo_object", "demo_texture")
DEFECT_TYPES: tuple[str, ...] = ("hole", "scratch", "stain")

_SPLIT_CODES = {"train": 0, "test": 1}


def default_demo_root() -> Path:
    """``data/demo`` relative to the current directory (git-ignored)."""
    return Path("data/demo")


# --------------------------------------------------------------------------- good images


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float64."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c, indexing="ij")


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Basket-weave carpet with random shift/rotation, fibre noise and illumination change."""
    y, x = _grid(size)
    period = size / 16.0
    theta = math.radians(rng.uniform(-2.0, 2.0))
    shift = rng.uniform(0.0, 2.0 * period, size=2)
    u = (x * math.cos(theta) + y * math.sin(theta) + shift[0]) / period
    v = (-x * math.sin(theta) + y * math.cos(theta) + shift[1]) / period
    fu, fv = u - np.floor(u), v - np.floor(v)
    horizontal = ((np.floor(u) + np.floor(v)) % 2) == 0
    fibre = rng.uniform(0, 2 * math.pi, size=2)
    h = 0.42 + 0.50 * np.sin(math.pi * fv) ** 0.7 + 0.05 * np.sin(2 * math.pi * 5 * fu + fibre[0])
    w = 0.36 + 0.46 * np.sin(math.pi * fu) ** 0.7 + 0.05 * np.sin(2 * math.pi * 5 * fv + fibre[1])
    lum = np.where(horizontal, h, w)
    gx, gy = rng.uniform(-0.10, 0.10, size=2)
    lum = lum * rng.uniform(0.93, 1.07) * (1.0 + gx * (x / size - 0.5) + gy * (y / size - 0.5))
    colour = np.array([0.70, 0.55, 0.40]) + rng.uniform(-0.02, 0.02, size=3)
    img = lum[..., None] * colour + rng.normal(0.0, 0.025, size=(size, size, 3))
    return img, None


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Bottle top from above: ringed metallic cap with ridges and a notch, shifted and rotated.

    Returns the image and the cap's (centre x, centre y, radius) in pixels for defect placement.
    """
    y, x = _grid(size)
    radius = 0.36 * size
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
    rot = rng.uniform(0.0, 2.0 * math.pi)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy) / radius
    phi = np.arctan2(dy, dx)
    aa = 1.0 / radius  # ~1 px transition width, in units of the radius

    ridges = 0.06 * np.cos(8 * (phi - rot))
    lum = np.full_like(r, 0.10)  # background
    lum = lum + (0.78 - 0.10) * _smoothstep(1.0 + aa, 1.0 - aa, r)  # outer rim
    lum = lum + (0.32 - 0.78) * _smoothstep(0.86 + aa, 0.86 - aa, r)  # groove
    lum = lum + (0.66 - 0.32) * _smoothstep(0.80 + aa, 0.80 - aa, r)  # cap surface
    lum = lum + ridges * _smoothstep(0.80 + aa, 0.80 - aa, r) * _smoothstep(0.44, 0.46, r)
    lum = lum + (0.88 - 0.66) * _smoothstep(0.46 + aa, 0.46 - aa, r)  # highlight ring
    lum = lum + (0.40 - 0.88) * _smoothstep(0.40 + aa, 0.40 - aa, r)  # centre recess
    lum = lum - 0.12 * _smoothstep(0.40, 0.0, r)  # recess darker towards the centre
    # A small dark notch on the cap marks its orientation.
    nx = cx + 0.63 * radius * math.cos(rot)
    ny = cy + 0.63 * radius * math.sin(rot)
    notch = _smoothstep(0.06 * radius + 1, 0.06 * radius - 1, np.hypot(x - nx, y - ny))
    lum = lum - 0.30 * notch
    # Directional light on the cap, slight global brightness change, vignette on background.
    light = rng.uniform(-0.3, 0.3) + math.pi / 4
    on_cap = _smoothstep(1.0 + aa, 1.0 - aa, r)
    lum = lum * (1.0 + 0.10 * on_cap * r * np.cos(phi - light)) * rng.uniform(0.94, 1.06)
    lum = lum * (1.0 - 0.35 * (1 - on_cap) * _smoothstep(1.0, 2.0, r))
    colour = np.array([0.92, 0.96, 1.00]) + rng.uniform(-0.02, 0.02, size=3)
    img = lum[..., None] * colour + rng.normal(0.0, 0.015, size=(size, size, 3))
    return img, (float(cx), float(cy), radius)


# --------------------------------------------------------------------------- defects


def _blob_polygon(
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


def _polygon_mask(size: int, poly: list[tuple[float, float]]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(poly, fill=255)
    return np.asarray(canvas) > 0


def _scratch(
    img: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """1-2 thin, slightly bent line segments, brighter or darker than the surface."""
    size = img.shape[0]
    canvas = Image.new("L", (size, size), 0)
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


def _hole(
    img: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """An irregular blob darkened towards its middle (the surface shows faintly through)."""
    size = img.shape[0]
    r0 = max(rng.uniform(0.02, 0.055) * size, 3.0)
    mask = _polygon_mask(size, _blob_polygon(rng, centre, r0))
    y, x = _grid(size)
    depth = _smoothstep(0.0, r0, r0 - np.hypot(x - centre[0], y - centre[1]))  # 1 at centre
    keep = rng.uniform(0.15, 0.55) * (1.0 - 0.4 * depth)
    img[mask] *= keep[mask][:, None]
    return mask


_STAIN_COLOURS = np.array(
    [[0.55, 0.22, 0.08], [0.20, 0.45, 0.12], [0.15, 0.22, 0.60], [0.80, 0.65, 0.05]]
)


def _stain(
    img: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """A translucent coloured blob, strongest in its middle."""
    size = img.shape[0]
    r0 = max(rng.uniform(0.03, 0.07) * size, 4.0)
    mask = _polygon_mask(size, _blob_polygon(rng, centre, r0))
    soft = Image.fromarray((mask * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=r0 / 3)
    )
    inner = np.asarray(soft, dtype=np.float64) / 255.0
    alpha = rng.uniform(0.25, 0.6) * (0.55 + 0.45 * inner / max(inner.max(), 1e-6)) * mask
    colour = _STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))]
    lum = img.mean(axis=2, keepdims=True)
    tinted = colour * (0.5 + 0.8 * lum)  # keeps some of the underlying structure
    img[:] = img * (1.0 - alpha[..., None]) + tinted * alpha[..., None]
    return mask


_DEFECTS: dict[str, Callable[..., np.ndarray]] = {
    "hole": _hole,
    "scratch": _scratch,
    "stain": _stain,
}


def _defect_centre(
    rng: np.random.Generator, size: int, cap: tuple[float, ...] | None
) -> tuple[float, float]:
    """Anywhere on a texture (away from the border); on the cap surface of an object."""
    if cap is None:
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        return float(cx), float(cy)
    r = cap[2] * rng.uniform(0.52, 0.72)
    a = rng.uniform(0.0, 2.0 * math.pi)
    return cap[0] + r * math.cos(a), cap[1] + r * math.sin(a)


def _render(
    category: str, size: int, seed: int, split: str, defect: str, index: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(image, mask, clean image) for one file, drawn from its own seeded random stream.

    Images are uint8 RGB; the mask (None for good images) is uint8 0/255 and marks exactly
    the pixels the defect changed; ``clean`` is the same image before the defect was drawn.
    """
    cat_code = CATEGORIES.index(category)
    defect_code = 0 if defect == "good" else 1 + DEFECT_TYPES.index(defect)
    rng = np.random.default_rng([seed, cat_code, _SPLIT_CODES[split], defect_code, index])
    maker = _texture if category == "demo_texture" else _object
    img, cap = maker(rng, size)
    clean = _to_uint8(img)
    mask = None
    if defect != "good":
        centre = _defect_centre(rng, size, cap)
        hit = _DEFECTS[defect](img, rng, centre, size / 256.0)
        mask = np.where(hit, 255, 0).astype(np.uint8)
    return _to_uint8(img), mask, clean


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _params(size: int, n_train: int, n_test_good: int, n_test_defect: int, seed: int) -> dict:
    return {
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "seed": seed,
    }


def _plan(params: dict) -> list[tuple[str, str, str, int]]:
    """(category, split, defect_type, index) of every image to write."""
    jobs = []
    for cat in CATEGORIES:
        jobs += [(cat, "train", "good", i) for i in range(params["n_train"])]
        jobs += [(cat, "test", "good", i) for i in range(params["n_test_good"])]
        for defect in DEFECT_TYPES:
            jobs += [(cat, "test", defect, i) for i in range(params["n_test_defect"])]
    return jobs


def _is_complete(root: Path, params: dict) -> bool:
    """True when ``root`` holds this generator version's output for ``params``, all files intact."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or (
        manifest.get("generator") != GENERATOR
        or manifest.get("version") != GENERATOR_VERSION
        or manifest.get("params") != params
    ):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, nbytes in files.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != nbytes:
            return False
    return True


def make_demo_dataset(
    root: Path,
    *,
    size: int = 256,
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 4,
    seed: int = 0,
) -> Path:
    """Write the demo dataset under ``root`` (MVTec layout plus ``demo.json``); returns ``root``.

    Idempotent: a complete dataset from the same generator version and parameters is left
    untouched; otherwise the demo category folders are rewritten.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    if min(n_train, n_test_good, n_test_defect) < 1:
        raise ValueError("n_train, n_test_good and n_test_defect must each be >= 1")
    root = Path(root)
    params = _params(size, n_train, n_test_good, n_test_defect, seed)
    if _is_complete(root, params):
        logger.info("demo dataset already complete at %s", root)
        return root

    logger.info("writing demo dataset to %s (%s)", root, params)
    (root / MANIFEST).unlink(missing_ok=True)
    for cat in CATEGORIES:
        if (root / cat).exists():
            shutil.rmtree(root / cat)
    files: dict[str, int] = {}
    for cat, split, defect, i in tqdm(_plan(params), desc="demo dataset", unit="img", leave=False):
        img, mask, _ = _render(cat, size, seed, split, defect, i)
        rel = Path(cat, split, defect, f"{i:03d}.png")
        outputs = [(rel, img)]
        if mask is not None:
            outputs.append((Path(cat, "ground_truth", defect, f"{i:03d}_mask.png"), mask))
        for relpath, arr in outputs:
            path = root / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path, format="PNG", compress_level=1)
            files[relpath.as_posix()] = path.stat().st_size
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "params": params,
        "categories": list(CATEGORIES),
        "defect_types": list(DEFECT_TYPES),
        "files": dict(sorted(files.items())),
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)  # written last: its presence marks a complete dataset
    return root


def ensure_demo_dataset(root: Path | None = None) -> Path:
    """The demo dataset with default parameters at ``root`` (default ``data/demo``)."""
    return make_demo_dataset(default_demo_root() if root is None else Path(root))


__all__ = [
    "CATEGORIES",
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "default_demo_root",
    "ensure_demo_dataset",
    "make_demo_dataset",
]
