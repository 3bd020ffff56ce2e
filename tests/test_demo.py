"""Demo dataset generator: layout, exact masks, determinism, idempotence and speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchbank.data import demo
from patchbank.data.mvtec import discover, list_categories

SMALL = {"size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect": 2}


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
    assert list_categories(root) == ["demo_object", "demo_texture"]
    for cat in demo.CATEGORIES:
        assert len(discover(root, cat, "train")) == 24
        test = discover(root, cat, "test")
        assert sorted({s.defect_type for s in test}) == ["good", "hole", "scratch", "stain"]
        assert sum(s.label == 0 for s in test) == 8 and sum(s.label for s in test) == 12
        for s in test:
            img = Image.open(s.path)
            assert (img.mode, img.size) == ("RGB", (256, 256))
            if s.mask_path is None:
                continue
            mask = Image.open(s.mask_path)
            assert (mask.mode, mask.size) == ("L", (256, 256))
            values = np.unique(np.asarray(mask))
            assert values.tolist() == [0, 255]
            area = (np.asarray(mask) > 0).mean()
            assert 0.0002 < area < 0.05, (s.path, area)  # small, never empty nor huge
    manifest = json.loads((root / demo.MANIFEST).read_text())
    assert manifest["version"] == demo.GENERATOR_VERSION
    assert manifest["params"] == {
        "size": 256,
        "n_train": 24,
        "n_test_good": 8,
        "n_test_defect": 4,
        "seed": 0,
    }
    assert len(manifest["files"]) == 2 * (24 + 8 + 3 * 4 + 3 * 4)


@pytest.mark.parametrize("category", demo.CATEGORIES)
@pytest.mark.parametrize("defect", demo.DEFECT_TYPES)
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


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _snapshot(demo.make_demo_dataset(tmp_path / "a", **SMALL))
    b = _snapshot(demo.make_demo_dataset(tmp_path / "b", **SMALL))
    assert a == b and len(a) == 1 + 2 * (3 + 2 + 3 * 2 + 3 * 2)
    c = _snapshot(demo.make_demo_dataset(tmp_path / "c", **SMALL, seed=1))
    assert c.keys() == a.keys()
    assert c["demo_texture/train/good/000.png"] != a["demo_texture/train/good/000.png"]


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


def test_default_root_and_ensure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert demo.default_demo_root() == Path("data/demo")
    monkeypatch.chdir(tmp_path)
    root = demo.ensure_demo_dataset()
    assert root == Path("data/demo") and (tmp_path / "data" / "demo" / demo.MANIFEST).is_file()
    mtimes = _mtimes(tmp_path / "data" / "demo")
    assert demo.ensure_demo_dataset(tmp_path / "data" / "demo") == tmp_path / "data" / "demo"
    assert _mtimes(tmp_path / "data" / "demo") == mtimes


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.make_demo_dataset(tmp_path, size=32)
    with pytest.raises(ValueError):
        demo.make_demo_dataset(tmp_path, n_test_defect=0)
    assert not any(tmp_path.iterdir())
