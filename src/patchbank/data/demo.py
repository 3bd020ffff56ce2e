"""Embedded demo dataset: a small, seeded, procedurally generated MVTec AD-layout dataset.

Three categories, all with exact masks:

* ``demo_texture`` (a woven, carpet-like periodic pattern) and ``demo_object`` (a bottle top
  seen from above on a dark background): square RGB images with three defect types,
  ``scratch`` (thin bright/dark line segments), ``hole`` (a dark blob) and ``stain`` (a
  coloured smooth blob).
* ``demo_crack``: single-channel grayscale (PNG mode ``L``) images of a brushed metal plate with
  two mounting holes, about 2.5 times taller than wide and of varying size (about 96x240 px at
  the default ``size=256``), so resizing to a square model input squashes them. Defects:
  ``crack`` (thin dark curved lines, 1-4 px wide, sometimes branching) and ``uneven`` (a
  low-contrast bright or dark blotch).

Uses numpy and PIL only; the same parameters give identical bytes.
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

from patchbank.data.shapes import DRAWERS as _DEFECTS
from patchbank.data.shapes import blob_polygon as _blob_polygon
from patchbank.data.shapes import pixel_grid
from patchbank.data.shapes import smoothstep as _smoothstep

logger = logging.getLogger(__name__)

GENERATOR = "patchbank.data.demo"
# Bump when the bytes written for an existing category change (every category is rewritten).
# A category added later is generated next to the intact ones of an older dataset.
GENERATOR_VERSION = 1
MANIFEST = "demo.json"
DEFECTS: dict[str, tuple[str, ...]] = {
    "demo_crack": ("crack", "uneven"),
    "demo_object": ("hole", "scratch", "stain"),
    "demo_texture": ("hole", "scratch", "stain"),
}
CATEGORIES: tuple[str, ...] = tuple(sorted(DEFECTS))
DEFECT_TYPES: tuple[str, ...] = tuple(sorted({d for ds in DEFECTS.values() for d in ds}))
"""Every defect type of any category; ``DEFECTS[category]`` lists one category's."""

# Part of every file's random seed: never renumber (demo_crack was added after the other two).
_CATEGORY_CODES = {"demo_object": 0, "demo_texture": 1, "demo_crack": 2}

_SPLIT_CODES = {"train": 0, "test": 1}


def default_demo_root() -> Path:
    """``data/demo`` relative to the current directory (git-ignored)."""
    return Path("data/demo")


# --------------------------------------------------------------------------- good images


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float64."""
    return pixel_grid(size)


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


# --------------------------------------------------------------------------- demo_crack


def _crack_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(H, W) of one demo_crack image: about 0.94 * size tall, 2.35-2.65 times taller than wide,
    overall scale varying by -20..+20 % between images (96x240 px nominal at size 256)."""
    height = max(round(0.9375 * size * rng.uniform(0.8, 1.2)), 40)
    width = max(round(height / rng.uniform(2.35, 2.65)), 16)
    return height, width


def _noise_field(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]
) -> np.ndarray:
    """Smooth noise of ``shape`` (H, W): a (cells) grid of N(0, 1) values resized bicubically."""
    coarse = rng.normal(0.0, 1.0, size=(max(cells[0], 2), max(cells[1], 2))).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float64)


def _plate(
    rng: np.random.Generator, shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """A brushed metal plate with two mounting holes on a dark background, grayscale (H, W).

    Natural variation: position jitter and a slight rotation of the plate, brushed grain,
    low-frequency mottling, a random illumination gradient and gain, sensor noise.
    Returns (image, (cx, cy, angle, half width, half height), surface) where ``surface`` marks
    the flat plate area, away from its bevelled rim and the holes, that defects may change.
    """
    h, w = shape
    y, x = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    cx = w / 2 + rng.uniform(-0.04, 0.04) * w
    cy = h / 2 + rng.uniform(-0.02, 0.02) * h
    ang = math.radians(rng.uniform(-1.5, 1.5))
    u = (x - cx) * math.cos(ang) + (y - cy) * math.sin(ang)  # plate coordinates
    v = -(x - cx) * math.sin(ang) + (y - cy) * math.cos(ang)
    hw, hh = 0.37 * w, 0.45 * h
    corner = 0.14 * w
    qx, qy = np.abs(u) - (hw - corner), np.abs(v) - (hh - corner)
    sdf = (
        np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        + np.minimum(np.maximum(qx, qy), 0.0)
        - corner
    )  # signed distance to the plate outline, negative inside
    inside = _smoothstep(0.7, -0.7, sdf)
    bevel = max(1.5, 0.03 * w)

    grain = _noise_field(rng, shape, (max(h // 24, 2), w))  # vertical brushing streaks
    mottle = _noise_field(rng, shape, (5, 3))
    lum_plate = 0.55 + 0.025 * grain + 0.02 * mottle
    lum_plate = lum_plate + 0.12 * _smoothstep(-bevel, -0.3 * bevel, sdf)  # bright rim
    lum = 0.14 + 0.02 * mottle + (lum_plate - 0.14) * inside

    hole_r = 0.13 * w
    surface = sdf < -(bevel + 1.0)
    for sign in (-1.0, 1.0):
        d = np.hypot(u, v - sign * (hh - 0.12 * h))
        lum = lum - (lum - 0.10) * _smoothstep(hole_r + 0.7, hole_r - 0.7, d)  # through-hole
        lum = lum + 0.10 * _smoothstep(hole_r + 2.0, hole_r + 0.7, d) * (d > hole_r)  # chamfer
        surface &= d > hole_r + 3.0

    gx, gy = rng.uniform(-0.10, 0.10), rng.uniform(-0.15, 0.15)
    lum = lum * rng.uniform(0.9, 1.1) * (1.0 + gx * (x / w - 0.5) + gy * (y / h - 0.5))
    img = lum + rng.normal(0.0, 0.015, size=shape)
    # keep the plate clear of 0 and 255 so that every defect pixel visibly changes
    img = np.where(surface, np.clip(img, 0.15, 0.9), img)
    return img, (cx, cy, ang, hw, hh), surface


def _plate_point(rng: np.random.Generator, plate: tuple[float, ...]) -> tuple[float, float]:
    """A random point (x, y) in the middle of the plate, between the holes."""
    cx, cy, ang, hw, hh = plate
    u, v = rng.uniform(-0.45, 0.45) * hw, rng.uniform(-0.4, 0.4) * hh
    return cx + u * math.cos(ang) - v * math.sin(ang), cy + u * math.sin(ang) + v * math.cos(ang)


def _walk(
    rng: np.random.Generator, start: tuple[float, float], angle: float, length: float, step: float
) -> list[tuple[float, float]]:
    """A polyline from ``start``: ``length`` px in steps of ``step``, the heading wandering."""
    pts = [start]
    for _ in range(max(int(length / step), 1)):
        angle += rng.normal(0.0, 0.3)
        x, y = pts[-1]
        pts.append((x + step * math.cos(angle), y + step * math.sin(angle)))
    return pts


def _crack(
    img: np.ndarray, rng: np.random.Generator, plate: tuple[float, ...], surface: np.ndarray
) -> np.ndarray:
    """A thin dark crack grown both ways from a point, with a thinner branch 60 % of the time."""
    h, w = img.shape
    scale = h / 240.0
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    start = _plate_point(rng, plate)
    heading = rng.uniform(0.0, math.pi)
    length = rng.uniform(0.12, 0.25) * h  # each way
    step = max(2.0, 0.02 * h)
    main = (
        _walk(rng, start, heading, length, step)[::-1]
        + _walk(rng, start, heading + math.pi, length, step)[1:]
    )
    width = max(1, round(float(rng.choice([1.0, 2.0, 3.0])) * scale))
    draw.line(main, fill=255, width=width, joint="curve" if width > 2 else None)
    if rng.random() < 0.6:
        fork = main[int(rng.integers(len(main) // 4, 3 * len(main) // 4 + 1))]
        off = rng.uniform(0.4, 1.0) * (1.0 if rng.random() < 0.5 else -1.0)
        branch = _walk(rng, fork, heading + off, rng.uniform(0.3, 0.6) * length, step)
        draw.line(branch, fill=255, width=max(1, width - 1))
    mask = (np.asarray(canvas) > 0) & surface
    keep = rng.uniform(0.45, 0.8) + rng.normal(0.0, 0.03, size=int(mask.sum())).clip(-0.05, 0.05)
    img[mask] *= keep
    return mask


def _uneven(
    img: np.ndarray, rng: np.random.Generator, plate: tuple[float, ...], surface: np.ndarray
) -> np.ndarray:
    """A low-contrast, soft-edged brighter or darker blotch (3-20 grey levels)."""
    h, w = img.shape
    r0 = rng.uniform(0.2, 0.32) * w
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(_blob_polygon(rng, _plate_point(rng, plate), r0), fill=255)
    mask = (np.asarray(canvas) > 0) & surface
    soft = Image.fromarray((mask * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=r0 / 3)
    )
    inner = np.asarray(soft, dtype=np.float64) / 255.0
    peak = rng.uniform(0.04, 0.08) * (1.0 if rng.random() < 0.5 else -1.0)
    img[mask] += peak * (0.3 + 0.7 * inner[mask] / max(float(inner.max()), 1e-6))
    return mask


_CRACK_DEFECTS: dict[str, Callable[..., np.ndarray]] = {"crack": _crack, "uneven": _uneven}


def _render(
    category: str, size: int, seed: int, split: str, defect: str, index: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(image, mask, clean image) for one file, drawn from its own seeded random stream.

    Images are uint8 RGB (H, W, 3), square of side ``size``, except for ``demo_crack``:
    uint8 grayscale (H, W), non-square, H and W drawn per image (see ``_crack_shape``).
    The mask (None for good images) is uint8 0/255 of the image's (H, W) and marks exactly
    the pixels the defect changed; ``clean`` is the same image before the defect was drawn.
    """
    defect_code = 0 if defect == "good" else 1 + DEFECTS[category].index(defect)
    rng = np.random.default_rng(
        [seed, _CATEGORY_CODES[category], _SPLIT_CODES[split], defect_code, index]
    )
    if category == "demo_crack":
        gray, plate, surface = _plate(rng, _crack_shape(rng, size))
        clean = _to_uint8(gray)
        mask = None
        if defect != "good":
            hit = _CRACK_DEFECTS[defect](gray, rng, plate, surface)
            mask = np.where(hit, 255, 0).astype(np.uint8)
        return _to_uint8(gray), mask, clean
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


def _plan(
    params: dict, categories: tuple[str, ...] = CATEGORIES
) -> list[tuple[str, str, str, int]]:
    """(category, split, defect_type, index) of every image to write."""
    jobs = []
    for cat in categories:
        jobs += [(cat, "train", "good", i) for i in range(params["n_train"])]
        jobs += [(cat, "test", "good", i) for i in range(params["n_test_good"])]
        for defect in DEFECTS[cat]:
            jobs += [(cat, "test", defect, i) for i in range(params["n_test_defect"])]
    return jobs


def _n_files(params: dict, category: str) -> int:
    """Images plus masks one category has."""
    n_defect = len(DEFECTS[category]) * params["n_test_defect"]
    return params["n_train"] + params["n_test_good"] + 2 * n_defect


def _intact(root: Path, params: dict) -> dict[str, int]:
    """Manifest entries (relative path -> bytes) of the categories at ``root`` that are complete.

    A category is complete when the manifest is from this generator version with ``params``,
    lists the category with its current defect types, and all of the category's files are on
    disk with their recorded sizes. Manifests written before ``demo_crack`` existed (one
    ``defect_types`` list for all categories) still vouch for the categories they list.
    """
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict) or (
        manifest.get("generator") != GENERATOR
        or manifest.get("version") != GENERATOR_VERSION
        or manifest.get("params") != params
    ):
        return {}
    files, listed, defects = (manifest.get(k) for k in ("files", "categories", "defect_types"))
    if not isinstance(files, dict) or not isinstance(listed, list):
        return {}
    intact: dict[str, int] = {}
    for cat in CATEGORIES:
        recorded = defects.get(cat) if isinstance(defects, dict) else defects
        if cat not in listed or recorded != list(DEFECTS[cat]):
            continue
        mine = {rel: n for rel, n in files.items() if rel.startswith(cat + "/")}
        if len(mine) != _n_files(params, cat):
            continue
        if all(
            (root / rel).is_file() and (root / rel).stat().st_size == n for rel, n in mine.items()
        ):
            intact.update(mine)
    return intact


def _write_manifest(root: Path, params: dict, files: dict[str, int]) -> None:
    """Atomically write ``demo.json`` vouching for the categories that ``files`` covers."""
    cats = [c for c in CATEGORIES if any(rel.startswith(c + "/") for rel in files)]
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "params": params,
        "categories": cats,
        "defect_types": {c: list(DEFECTS[c]) for c in cats},
        "files": dict(sorted(files.items())),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)


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

    ``size`` is the side of the square categories; ``demo_crack`` images are about
    ``0.94 * size`` tall and 2.5 times narrower, varying per image. Idempotent per category:
    categories already complete for this generator version and these parameters are left
    untouched (files and mtimes), the other category folders are rewritten, e.g. only
    ``demo_crack`` in a dataset written before that category existed.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    if min(n_train, n_test_good, n_test_defect) < 1:
        raise ValueError("n_train, n_test_good and n_test_defect must each be >= 1")
    root = Path(root)
    params = _params(size, n_train, n_test_good, n_test_defect, seed)
    files = _intact(root, params)
    todo = tuple(c for c in CATEGORIES if not any(rel.startswith(c + "/") for rel in files))
    if not todo:
        logger.info("demo dataset already complete at %s", root)
        return root

    logger.info("writing demo dataset %s to %s (%s)", ", ".join(todo), root, params)
    # From here on the manifest vouches only for the intact categories, even if we crash.
    if files:
        _write_manifest(root, params, files)
    else:
        (root / MANIFEST).unlink(missing_ok=True)
    for cat in todo:
        if (root / cat).exists():
            shutil.rmtree(root / cat)
    plan = _plan(params, todo)
    for cat, split, defect, i in tqdm(plan, desc="demo dataset", unit="img", leave=False):
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
    _write_manifest(root, params, files)  # written last: it vouches for complete categories
    return root


def ensure_demo_dataset(root: Path | None = None) -> Path:
    """The demo dataset with default parameters at ``root`` (default ``data/demo``)."""
    return make_demo_dataset(default_demo_root() if root is None else Path(root))


__all__ = [
    "CATEGORIES",
    "DEFECTS",
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "default_demo_root",
    "ensure_demo_dataset",
    "make_demo_dataset",
]
