"""Write an MVTec-layout validation set with synthetic defects from a held-out part of train/good.

``write_synthetic_set(data_root, category, out)`` writes ``<out>/<category>/``:

- ``train/good/``: the training images that were not held out (copied byte for byte);
- ``test/good/``: half of the held-out training images (copied);
- ``test/<kind>/<stem>.png`` and ``ground_truth/<kind>/<stem>_mask.png``: one synthetic defect
  of each kind (:data:`patchbank.synth.generators.GENERATORS`) in each of the other held-out
  images; masks are 0/255 PNGs of the image's size;
- ``synth.json``: the manifest (settings, which source image each file came from, file sizes),
  written last.

Test images of the real dataset are never read. The held-out split and every defect are seeded
(``seed``), so the same settings give identical bytes. The category folder is built under a
temporary name inside ``out`` and renamed into place; nothing is written outside ``out``. A
folder holding the same set is skipped; a different one is replaced only with ``overwrite``,
and a folder that is not a synthetic set is never replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from patchbank.core.atomic import atomic_write_text, file_lock, is_stale, temp_name
from patchbank.core.errors import DatasetError, PatchbankError
from patchbank.data.mvtec import discover, files_hash, load_image
from patchbank.synth.generators import GENERATORS

log = logging.getLogger(__name__)

GENERATOR = "patchbank.synth"
#: Bump when the bytes written for the same settings change.
VERSION = 1
MANIFEST = "synth.json"
#: Default defect kinds of a synthetic set.
DEFAULT_KINDS: tuple[str, ...] = ("cutpaste", "scar", "perlin", "scratch", "hole", "stain")


def _kind_code(kind: str) -> int:
    """A stable integer per kind name, part of each defect's seed."""
    return zlib.crc32(kind.encode())


def read_pixels(path: Path) -> np.ndarray:
    """uint8 (H, W) for 8-bit grayscale images, else (H, W, 3) RGB (16-bit etc. converted)."""
    try:
        with Image.open(path) as img:
            if img.mode == "L":
                return np.asarray(img.convert("L"))
    except OSError as err:
        raise DatasetError(f"{path}: cannot read image ({err}); re-save it as PNG") from None
    return np.asarray(load_image(path))


def plan_split(n: int, holdout: float, seed: int, where: str = "train/good",
               max_holdout: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(train, test-good, defect-source) indices into the sorted train/good images.

    ``round(holdout * n)`` images (at least 2, at most ``max_holdout``) are held out by a seeded
    permutation; the first
    half of them (rounded up) become ``test/good``, the rest carry the synthetic defects.
    """
    if not 0 < holdout < 1:
        raise PatchbankError(f"--holdout {holdout}: must be between 0 and 1, e.g. 0.25")
    n_hold = max(2, round(holdout * n))
    if max_holdout is not None:
        n_hold = max(2, min(n_hold, int(max_holdout)))
    if n - n_hold < 2:
        raise DatasetError(f"{where}: {n} training images, too few to hold out {n_hold} and "
                           "keep 2 for training; lower --holdout or add images")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    held = perm[:n_hold]
    n_good = math.ceil(n_hold / 2)
    return (sorted(perm[n_hold:].tolist()), sorted(held[:n_good].tolist()),
            sorted(held[n_good:].tolist()))


def settings(data_root: Path, category: str, kinds: Sequence[str], holdout: float, seed: int,
             perlin_source: str, max_holdout: int | None = None) -> dict[str, Any]:
    """What decides a synthetic set's content (compared with its manifest)."""
    samples = discover(data_root, category, "train")
    return {
        "category": category,
        "source_root": str(Path(data_root).resolve()),
        "source_files_hash": files_hash(samples, data_root),
        "n_source_images": len(samples),
        "kinds": list(kinds),
        "holdout": float(holdout),
        **({"max_holdout": int(max_holdout)} if max_holdout is not None else {}),
        "seed": int(seed),
        "perlin_source": perlin_source,
    }


def _intact(folder: Path, expected: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(up to date, manifest found): the manifest matches ``expected`` and every file it lists
    is present with its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, None
    if not isinstance(manifest, dict):
        return False, None
    ok = (manifest.get("generator") == GENERATOR and manifest.get("version") == VERSION
          and manifest.get("settings") == expected and isinstance(manifest.get("files"), dict))
    if ok:
        ok = all((folder / rel).is_file() and (folder / rel).stat().st_size == size
                 for rel, size in manifest["files"].items())
    return ok, manifest


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def write_synthetic_set(data_root: Path, category: str, out: Path, *,
                        kinds: Sequence[str] = DEFAULT_KINDS, holdout: float = 0.25,
                        seed: int = 0, perlin_source: str = "image",
                        max_holdout: int | None = None, overwrite: bool = False) -> str:
    """Write ``<out>/<category>`` (see the module docstring); returns ``"written"``,
    ``"overwritten"`` or ``"skipped"`` (already up to date).

    ``perlin_source``: ``"image"`` blends Perlin defects with another (kept) training image of
    the category, ``"procedural"`` with a generated texture. ``max_holdout`` caps the number
    of held-out images (large categories: the test set grows by ``len(kinds)`` per source).
    """
    data_root, out = Path(data_root), Path(out)
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise PatchbankError(f"--kinds {','.join(kinds)}: choose from {', '.join(GENERATORS)}")
    if perlin_source not in ("image", "procedural"):
        raise PatchbankError(f"--perlin-source {perlin_source!r}: choose image or procedural")
    if out.resolve() == data_root.resolve() or data_root.resolve() in out.resolve().parents:
        raise PatchbankError(f"{out}: the output folder must lie outside the dataset "
                             f"{data_root}; pick another --out")
    expected = settings(data_root, category, kinds, holdout, seed, perlin_source, max_holdout)
    target = out / category
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".locks" / f"{category}.lock"):
        for left in out.glob(f".{category}.*.tmp"):  # folders of killed runs
            if left.is_dir() and is_stale(left):
                shutil.rmtree(left, ignore_errors=True)
        replaced = False
        if target.exists():
            ok, manifest = _intact(target, expected)
            if ok and not overwrite:
                log.info("%s: synthetic set up to date, skipped", target)
                return "skipped"
            if manifest is None and any(target.iterdir()):
                raise PatchbankError(f"{target}: exists and is not a synthetic set (no "
                                     f"{MANIFEST}); pick another --out or remove it")
            if not overwrite:
                raise PatchbankError(f"{target}: holds a synthetic set made with other "
                                     "settings; pass --overwrite to replace it")
            replaced = True
        tmp = temp_name(target)
        try:
            files, provenance = _build(data_root, category, tmp, kinds, holdout, seed,
                                       perlin_source, max_holdout)
            manifest = {"generator": GENERATOR, "version": VERSION, "settings": expected,
                        "sources": provenance, "files": files}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            old = temp_name(target) if target.exists() else None
            if old is not None:
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: synthetic set written (%d files)", target, len(files))
    return "overwritten" if replaced else "written"


def _build(data_root: Path, category: str, folder: Path, kinds: Sequence[str], holdout: float,
           seed: int, perlin_source: str, max_holdout: int | None
           ) -> tuple[dict[str, int], dict[str, str]]:
    """Write the set's images into ``folder``; returns (relative path -> size, relative path ->
    source image relative to the dataset root)."""
    samples = discover(data_root, category, "train")
    train_idx, good_idx, src_idx = plan_split(len(samples), holdout, seed,
                                              str(data_root / category / "train" / "good"),
                                              max_holdout)
    files: dict[str, int] = {}
    provenance: dict[str, str] = {}

    def record(rel: str, source: Path) -> None:
        files[rel] = (folder / rel).stat().st_size
        provenance[rel] = Path(source).relative_to(data_root).as_posix() \
            if Path(source).is_relative_to(data_root) else str(source)

    for split, idx in (("train", train_idx), ("test", good_idx)):
        for i in idx:
            src = samples[i].path
            rel = f"{split}/good/{src.name}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, folder / rel)
            record(rel, src)
    jobs = [(k, i) for i in src_idx for k in kinds]
    for kind, i in tqdm(jobs, desc=f"{category} synthetic defects", unit="img", leave=False):
        src = samples[i].path
        image = read_pixels(src)
        rng = np.random.default_rng([seed, _kind_code(kind), i])
        opts: dict[str, Any] = {}
        if kind == "perlin" and perlin_source == "image":
            other = samples[train_idx[int(rng.integers(len(train_idx)))]].path
            opts["source"] = read_pixels(other)
        defective, mask = GENERATORS[kind](image, rng, **opts)
        stem = src.stem
        rel_img, rel_mask = f"test/{kind}/{stem}.png", f"ground_truth/{kind}/{stem}_mask.png"
        _save_png(defective, folder / rel_img)
        _save_png(np.where(mask, 255, 0).astype(np.uint8), folder / rel_mask)
        record(rel_img, src)
        record(rel_mask, src)
    return dict(sorted(files.items())), dict(sorted(provenance.items()))


__all__ = ["DEFAULT_KINDS", "MANIFEST", "plan_split", "read_pixels", "write_synthetic_set"]
