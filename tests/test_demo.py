"""Demo dataset generator: layout, exact masks, determinism, idempotence and speed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchbank.data import demo
from patchbank.data.mvtec import discover, list_categories, load_image, load_mask

SMALL = {"size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect": 2}
SQUARE = ("demo_object", "demo_texture")  # RGB, size x size
N_SMALL = 2 * (3 + 2 + 3 * 2 * 2) + (3 + 2 + 2 * 2 * 2)  # images + masks


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_layout_and_masks_default_size(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    root = demo.make_demo_dataset(tmp_path / "demo")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0  # target < 5 s; slack for a busy 2-core machine
    assert root == tmp_path / "demo"
    assert demo.CATEGORIES == ("demo_crack", "demo_object", "demo_texture")
    assert list_categories(root) == list(demo.CATEGORIES)
    for cat in demo.CATEGORIES:
        assert len(discover(root, cat, "train")) == 24
        test = discover(root, cat, "test")
        assert sorted({s.defect_type for s in test}) == sorted(["good", *demo.DEFECTS[cat]])
        n_bad = 4 * len(demo.DEFECTS[cat])
        assert sum(s.label == 0 for s in test) == 8 and sum(s.label for s in test) == n_bad
        for s in test:
            img = Image.open(s.path)
            if cat in SQUARE:
                assert (img.mode, img.size) == ("RGB", (256, 256))
            if s.mask_path is None:
                continue
            mask = Image.open(s.mask_path)
            assert (mask.mode, mask.size) == ("L", img.size)
            values = np.unique(np.asarray(mask))
            assert values.tolist() == [0, 255]
            area = (np.asarray(mask) > 0).mean()
            limit = 0.12 if s.defect_type == "uneven" else 0.05
            assert 0.0002 < area < limit, (s.path, area)  # small, never empty nor huge
    manifest = json.loads((root / demo.MANIFEST).read_text())
    assert manifest["version"] == demo.GENERATOR_VERSION
    assert manifest["params"] == {
        "size": 256,
        "n_train": 24,
        "n_test_good": 8,
        "n_test_defect": 4,
        "seed": 0,
    }
    assert manifest["categories"] == list(demo.CATEGORIES)
    assert manifest["defect_types"] == {c: list(d) for c, d in demo.DEFECTS.items()}
    assert len(manifest["files"]) == 2 * (24 + 8 + 3 * 4 + 3 * 4) + (24 + 8 + 2 * 4 + 2 * 4)


def test_crack_category_is_grayscale_tall_and_of_varying_size(tmp_path: Path) -> None:
    root = demo.make_demo_dataset(tmp_path / "demo")
    samples = discover(root, "demo_crack", "train") + discover(root, "demo_crack", "test")
    assert len(samples) == 24 + 8 + 2 * 4
    sizes = []
    for s in samples:
        with Image.open(s.path) as img:
            assert img.mode == "L"  # real single-channel PNGs
            w, h = img.size
        sizes.append((w, h))
        assert 2.25 < h / w < 2.75, (s.path, w, h)
        assert 180 <= h <= 300 and 64 <= w <= 128, (s.path, w, h)
        if s.mask_path is not None:
            with Image.open(s.mask_path) as mask:
                assert (mask.mode, mask.size) == ("L", (w, h))
    assert len(set(sizes)) > 30  # nearly every image has its own size
    hs = [h for _, h in sizes]
    assert max(hs) - min(hs) > 50
    assert 2.4 < np.mean([h / w for w, h in sizes]) < 2.6  # ~96x240 on average
    assert 220 < np.mean(hs) < 260
    # the loader turns them into RGB with three equal channels
    s = next(s for s in samples if s.defect_type == "crack")
    rgb = np.asarray(load_image(s.path))
    assert rgb.shape == (*np.asarray(Image.open(s.path)).shape, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert load_mask(s.mask_path, (rgb.shape[1], rgb.shape[0])).any()


@pytest.mark.parametrize("category", SQUARE)
@pytest.mark.parametrize("defect", demo.DEFECTS["demo_object"])
def test_masks_mark_exactly_the_changed_pixels(category: str, defect: str) -> None:
    for index in range(6):
        img, mask, clean = demo._render(category, 128, 0, "test", defect, index)
        assert mask is not None
        hit = mask > 0
        assert hit.any()
        assert np.array_equal(img[~hit], clean[~hit])  # nothing changes outside the mask
        changed = np.abs(img.astype(int) - clean.astype(int)).max(axis=2)[hit]
        assert (changed > 0).mean() > 0.95 and changed.mean() > 10  # visible inside the mask


def test_good_images_vary_but_share_structure() -> None:
    a, _, _ = demo._render("demo_object", 128, 0, "train", "good", 0)
    b, _, _ = demo._render("demo_object", 128, 0, "train", "good", 1)
    assert not np.array_equal(a, b)
    # both are a bright cap on a dark background
    for img in (a, b):
        assert img[60:68, 20:28].mean() > 120 and img[:6, :6].mean() < 50
    t, _, _ = demo._render("demo_texture", 128, 0, "train", "good", 0)
    assert 60 < t.mean() < 200 and t.std() > 10  # a textured, mid-grey-brown surface


def _largest_square(hit: np.ndarray) -> int:
    """Side of the largest all-True square block in ``hit``."""
    k = 0
    while (
        k < min(hit.shape)
        and np.lib.stride_tricks.sliding_window_view(hit, (k + 1, k + 1)).all(axis=(2, 3)).any()
    ):
        k += 1
    return k


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("defect", demo.DEFECTS["demo_crack"])
def test_crack_masks_are_exactly_the_changed_pixels(size: int, defect: str) -> None:
    """mask > 0 is exactly {pixels whose grey value differs from the defect-free image}."""
    for seed in (0, 1):
        for index in range(10):
            img, mask, clean = demo._render("demo_crack", size, seed, "test", defect, index)
            assert mask is not None and img.ndim == 2 and img.shape == mask.shape == clean.shape
            hit = mask > 0
            assert hit.any()
            assert np.array_equal(hit, img != clean), (size, defect, seed, index)
            change = np.abs(img.astype(int) - clean.astype(int))[hit]
            if defect == "crack":
                assert hit.mean() < 0.02  # a thin line: small area ...
                assert _largest_square(hit) <= (2 if size == 64 else 5)  # ... a few px wide
                assert change.min() >= 5 and change.mean() > 20  # darker, clearly visible
            else:
                assert 0.01 < hit.mean() < 0.12  # a blotch
                assert change.min() >= 2 and change.max() <= 21  # low contrast
                assert 4 < change.mean() < 18


def test_crack_good_images_vary_but_share_structure() -> None:
    imgs = [demo._render("demo_crack", 256, 0, "train", "good", i)[0] for i in range(6)]
    assert len({img.shape for img in imgs}) == 6
    for img in imgs:
        h, w = img.shape
        mid = img[int(0.35 * h) : int(0.65 * h), int(0.3 * w) : int(0.7 * w)]
        assert 90 < mid.mean() < 190 and 2 < mid.std() < 25  # grainy plate, not flat
        assert img[:, :3].mean() < 60 and img[:, -3:].mean() < 60  # dark background
    # the same mid-plate window, resized to a common size, still differs between images
    crops = [
        np.asarray(Image.fromarray(img).resize((64, 160)), dtype=float)[40:120, 20:44]
        for img in imgs
    ]
    assert min(np.abs(a - b).mean() for a in crops for b in crops if a is not b) > 2


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _snapshot(demo.make_demo_dataset(tmp_path / "a", **SMALL))
    b = _snapshot(demo.make_demo_dataset(tmp_path / "b", **SMALL))
    assert a == b and len(a) == 1 + N_SMALL
    c = _snapshot(demo.make_demo_dataset(tmp_path / "c", **SMALL, seed=1))
    assert c.keys() == a.keys()
    for rel in a:
        if rel != demo.MANIFEST:
            assert c[rel] != a[rel], rel  # every image and mask changes with the seed


def test_idempotent_and_rewrites_on_change(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    demo.make_demo_dataset(root, **SMALL)
    before = _mtimes(root)
    time.sleep(0.01)
    demo.make_demo_dataset(root, **SMALL)
    assert _mtimes(root) == before  # nothing rewritten

    # an incomplete dataset (file deleted) is rewritten
    victim = root / "demo_object" / "ground_truth" / "hole" / "001_mask.png"
    victim.unlink()
    demo.make_demo_dataset(root, **SMALL)
    assert victim.is_file()

    # other parameters -> rewritten, without leftovers from the previous run
    original = _snapshot(root)
    demo.make_demo_dataset(root, **{**SMALL, "n_train": 2})
    after = _snapshot(root)
    assert "demo_object/train/good/002.png" not in after
    assert after["demo_object/train/good/001.png"] == original["demo_object/train/good/001.png"]
    assert json.loads(after["demo.json"])["params"]["n_train"] == 2

    # another generator version -> rewritten
    manifest = json.loads((root / demo.MANIFEST).read_text())
    manifest["version"] = demo.GENERATOR_VERSION - 1
    (root / demo.MANIFEST).write_text(json.dumps(manifest))
    demo.make_demo_dataset(root, **{**SMALL, "n_train": 2})
    assert json.loads((root / demo.MANIFEST).read_text())["version"] == demo.GENERATOR_VERSION


def test_old_dataset_without_crack_category_is_extended(tmp_path: Path) -> None:
    """A dataset written before demo_crack existed gets it; its other files stay untouched."""
    fresh = _snapshot(demo.make_demo_dataset(tmp_path / "fresh", **SMALL))
    root = demo.make_demo_dataset(tmp_path / "old", **SMALL)
    shutil.rmtree(root / "demo_crack")
    manifest = json.loads((root / demo.MANIFEST).read_text())
    manifest["categories"] = ["demo_object", "demo_texture"]  # the version-1 manifest format
    manifest["defect_types"] = ["hole", "scratch", "stain"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "demo_crack" not in k}
    (root / demo.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    before = _mtimes(root)
    time.sleep(0.01)
    demo.make_demo_dataset(root, **SMALL)
    after = _mtimes(root)
    assert {k: v for k, v in after.items() if k in before and "demo.json" not in k} == {
        k: v for k, v in before.items() if "demo.json" not in k
    }  # demo_object and demo_texture were not rewritten
    assert _snapshot(root) == fresh  # same bytes, manifest included, as a fresh dataset
    mtimes = _mtimes(root)
    demo.make_demo_dataset(root, **SMALL)
    assert _mtimes(root) == mtimes  # and complete now

    # a damaged category is rewritten alone
    (root / "demo_crack" / "ground_truth" / "crack" / "001_mask.png").unlink()
    demo.make_demo_dataset(root, **SMALL)
    assert _snapshot(root) == fresh
    changed = {k for k, v in _mtimes(root).items() if mtimes.get(k) != v}
    assert changed and all("demo_crack" in k or "demo.json" in k for k in changed)
    assert sum("demo_crack" in k for k in changed) == 3 + 2 + 2 * 2 * 2


def test_default_root_and_ensure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert demo.default_demo_root() == Path("data/demo")
    monkeypatch.chdir(tmp_path)
    root = demo.ensure_demo_dataset()
    assert root == Path("data/demo") and (tmp_path / "data" / "demo" / demo.MANIFEST).is_file()
    assert list_categories(root) == ["demo_crack", "demo_object", "demo_texture"]
    mtimes = _mtimes(tmp_path / "data" / "demo")
    assert demo.ensure_demo_dataset(tmp_path / "data" / "demo") == tmp_path / "data" / "demo"
    assert _mtimes(tmp_path / "data" / "demo") == mtimes


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.make_demo_dataset(tmp_path, size=32)
    with pytest.raises(ValueError):
        demo.make_demo_dataset(tmp_path, n_test_defect=0)
    assert not any(tmp_path.iterdir())
