"""Synthetic anomalies: generators' masks pinned on a known image, determinism, grayscale, and
the MVTec-layout synthetic validation set (layout, provenance, caching, every stage on it)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from patchbank.core.errors import DatasetError, PatchbankError
from patchbank.data.demo import _render, make_demo_dataset
from patchbank.data.mvtec import discover, load_mask
from patchbank.features.spec import ExtractSpec
from patchbank.stages.pipeline import run_pipeline
from patchbank.synth import GENERATORS, generate, write_synthetic_set
from patchbank.synth.dataset import MANIFEST, plan_split
from patchbank.synth.generators import perlin_mask, perlin_noise, procedural_texture


def known(gray: bool = False) -> np.ndarray:
    """A 96 x 128 image with gradients and a checkerboard (no two regions alike)."""
    y, x = np.mgrid[0:96, 0:128]
    r, g = (x * 2 + 20) % 256, (y * 2 + 40) % 256
    b = ((x // 8 + y // 8) % 2) * 120 + 60
    img = np.stack([r, g, b], -1).astype(np.uint8)
    return img.mean(-1).astype(np.uint8) if gray else img


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a != b
    return diff if diff.ndim == 2 else diff.any(axis=2)


# mask pixel count and bounding box (y0, y1, x0, x1) on known() with default_rng(7)
PINNED = {
    (False, "cutpaste"): (1254, (8, 29, 33, 89)),
    (False, "scar"): (36, (71, 79, 38, 41)),
    (False, "perlin"): (564, (0, 93, 2, 127)),
    (False, "scratch"): (31, (62, 83, 68, 75)),
    (False, "hole"): (49, (70, 78, 71, 78)),
    (False, "stain"): (77, (69, 79, 70, 79)),
    (True, "cutpaste"): (1254, (16, 37, 65, 121)),
    (True, "scar"): (36, (20, 28, 60, 67)),
    (True, "perlin"): (564, (0, 93, 2, 127)),
    (True, "scratch"): (31, (62, 83, 68, 75)),
    (True, "hole"): (49, (70, 78, 71, 78)),
    (True, "stain"): (77, (69, 79, 70, 79)),
}


@pytest.mark.parametrize("gray, kind", sorted(PINNED))
def test_generator_mask_is_pinned_and_exact(gray: bool, kind: str) -> None:
    image = known(gray)
    before = image.copy()
    out, mask = generate(kind, image, np.random.default_rng(7))
    assert np.array_equal(image, before)  # the input is not modified
    assert out.dtype == np.uint8 and out.shape == image.shape and mask.shape == (96, 128)
    assert mask.dtype == bool
    ys, xs = np.nonzero(mask)
    assert (int(mask.sum()), (ys.min(), ys.max(), xs.min(), xs.max())) == PINNED[gray, kind]
    diff = changed(out, image)
    assert not diff[~mask].any()  # nothing outside the mask changed
    assert diff[mask].mean() > 0.75  # and (almost) everything inside did


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("gray", [False, True])
def test_generators_over_seeds_change_only_the_mask(kind: str, gray: bool) -> None:
    image = known(gray)
    for seed in range(12):
        out, mask = GENERATORS[kind](image, np.random.default_rng(seed))
        area = mask.mean()
        assert 0.0002 < area <= 0.5, (seed, area)
        assert not changed(out, image)[~mask].any()
        assert changed(out, image)[mask].any()


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generators_are_deterministic(kind: str) -> None:
    image = known()
    a, ma = generate(kind, image, np.random.default_rng(3))
    b, mb = generate(kind, image, np.random.default_rng(3))
    c, mc = generate(kind, image, np.random.default_rng(4))
    assert a.tobytes() == b.tobytes() and ma.tobytes() == mb.tobytes()
    assert a.tobytes() != c.tobytes() and ma.tobytes() != mc.tobytes()


def test_cutpaste_rectangle_follows_the_paper() -> None:
    h, w = 96, 128
    for seed in range(30):
        _, mask = GENERATORS["cutpaste"](known(), np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        ch, cw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert mask.sum() == ch * cw  # one axis-aligned rectangle
        assert 0.018 <= ch * cw / (h * w) <= 0.16  # 2-15 % of the area (rounding)
        assert 0.25 <= cw / ch <= 1 / 0.25  # aspect in [0.3, 3.3] (rounding)


def test_scar_is_thin_and_scales_with_the_image() -> None:
    big = np.asarray(Image.fromarray(known()).resize((512, 384)))
    areas = [GENERATORS["scar"](big, np.random.default_rng(s))[1].sum() for s in range(20)]
    # 2-16 x 10-25 px at 256 px, here x1.5 per side: 45 to 900 px, a little more when rotated
    assert 40 <= min(areas) and max(areas) <= 1100


def test_perlin_noise_and_mask() -> None:
    noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= 1.0
    assert np.allclose(noise[::16, ::16], 0.0)  # zero at the lattice points
    with pytest.raises(ValueError, match="multiple"):
        perlin_noise((60, 64), (8, 8), np.random.default_rng(0))
    mask = perlin_mask((90, 130), np.random.default_rng(5))
    assert mask.shape == (90, 130)
    tex = procedural_texture((40, 50), 3, np.random.default_rng(1))
    assert tex.shape == (40, 50, 3) and tex.dtype == np.uint8 and tex.std() > 10
    assert np.array_equal(tex, procedural_texture((40, 50), 3, np.random.default_rng(1)))


def test_perlin_blends_with_the_given_source() -> None:
    image, source = known(), np.full((30, 40, 3), 255, np.uint8)
    out_src, mask_src = GENERATORS["perlin"](image, np.random.default_rng(2), source=source)
    out_tex, mask_tex = GENERATORS["perlin"](image, np.random.default_rng(2))
    assert np.array_equal(mask_src, mask_tex)  # the mask is drawn first
    assert not np.array_equal(out_src, out_tex)
    gray_out, _ = GENERATORS["perlin"](known(True), np.random.default_rng(2), source=source)
    assert gray_out.ndim == 2


def test_bad_images_are_refused() -> None:
    with pytest.raises(PatchbankError, match="uint8"):
        generate("cutpaste", known().astype(np.float32), np.random.default_rng(0))
    with pytest.raises(PatchbankError, match="too small"):
        generate("hole", np.zeros((8, 8), np.uint8), np.random.default_rng(0))
    with pytest.raises(PatchbankError, match="unknown synthetic anomaly 'dent'"):
        generate("dent", known(), np.random.default_rng(0))


def test_demo_dataset_bytes_unchanged_by_the_shared_drawing_code() -> None:
    # sha256 of image + mask bytes, computed with demo.py before its defects moved to synth
    for args, digest in [(("demo_object", 128, 0, "test", "scratch", 0), "03635b93c738b8e3"),
                         (("demo_texture", 128, 0, "test", "stain", 1), "c1030d3ea98ba71c"),
                         (("demo_object", 128, 0, "test", "hole", 2), "4d163941a5f43531")]:
        img, mask, _ = _render(*args)
        assert hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest()[:16] == digest


# --------------------------------------------------------------------------- synthetic sets


def test_plan_split() -> None:
    train, good, src = plan_split(20, 0.25, 0)
    assert (len(train), len(good), len(src)) == (15, 3, 2)
    assert sorted(train + good + src) == list(range(20))
    assert plan_split(20, 0.25, 0) == (train, good, src) != plan_split(20, 0.25, 1)
    with pytest.raises(DatasetError, match="too few"):
        plan_split(3, 0.5, 0)
    with pytest.raises(PatchbankError, match="between 0 and 1"):
        plan_split(10, 1.0, 0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", size=64, n_train=8,
                             n_test_good=2, n_test_defect=1)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


def test_synthetic_set_layout_masks_and_provenance(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "val"
    assert write_synthetic_set(demo, "demo_crack", out, holdout=0.5, seed=1) == "written"
    assert sorted(p.name for p in out.iterdir()) == [".locks", "demo_crack"]  # nothing else
    cat = out / "demo_crack"
    manifest = json.loads((cat / MANIFEST).read_text())
    src_train = {p.name for p in (demo / "demo_crack/train/good").iterdir()}
    train = sorted(p.name for p in (cat / "train/good").iterdir())
    good = sorted(p.name for p in (cat / "test/good").iterdir())
    assert (len(train), len(good)) == (4, 2) and not set(train) & set(good)
    kinds = sorted(GENERATORS)
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted([*kinds, "good"])
    # every file came from the real train/good, never from test
    assert all(v.startswith("demo_crack/train/good/") for v in manifest["sources"].values())
    sources = {Path(v).name for k, v in manifest["sources"].items() if k.startswith("test/scar")}
    assert len(sources) == 2 and sources <= src_train and not sources & set(train + good)
    for kind in kinds:
        for img_path in sorted((cat / "test" / kind).iterdir()):
            defect = np.asarray(Image.open(img_path))
            assert defect.ndim == 2  # demo_crack is grayscale and stays so
            original = np.asarray(Image.open(demo / manifest["sources"][
                f"test/{kind}/{img_path.name}"]))
            mask = load_mask(cat / "ground_truth" / kind / f"{img_path.stem}_mask.png",
                             (defect.shape[1], defect.shape[0]))
            assert mask.any() and not (defect != original)[~mask].any()
    samples = discover(out, "demo_crack", "test")
    assert len(samples) == 2 + 2 * len(kinds) and sum(s.label for s in samples) == 12
    # train copies are byte-identical
    assert (cat / "train/good" / train[0]).read_bytes() == \
        (demo / "demo_crack/train/good" / train[0]).read_bytes()


def test_synthetic_set_is_seeded_cached_and_guarded(demo: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_set(demo, "demo_object", a, holdout=0.5, seed=3)
    write_synthetic_set(demo, "demo_object", b, holdout=0.5, seed=3)
    assert _tree(a) == _tree(b)  # identical bytes, manifest included
    mtimes = {p: p.stat().st_mtime_ns for p in (a / "demo_object").rglob("*")}
    assert write_synthetic_set(demo, "demo_object", a, holdout=0.5, seed=3) == "skipped"
    assert {p: p.stat().st_mtime_ns for p in (a / "demo_object").rglob("*")} == mtimes
    with pytest.raises(PatchbankError, match="other settings; pass --overwrite"):
        write_synthetic_set(demo, "demo_object", a, holdout=0.5, seed=4)
    assert _tree(a) == _tree(b)
    assert write_synthetic_set(demo, "demo_object", a, holdout=0.5, seed=4,
                               overwrite=True) == "overwritten"
    assert _tree(a) != _tree(b)
    assert [p.name for p in a.iterdir() if p.name.startswith(".demo")] == []  # no temporaries
    # a damaged set is not "up to date"
    next((b / "demo_object/test/hole").iterdir()).write_bytes(b"x")
    with pytest.raises(PatchbankError, match="pass --overwrite"):
        write_synthetic_set(demo, "demo_object", b, holdout=0.5, seed=3)
    # a folder that is not a synthetic set is never replaced, even with overwrite
    (tmp_path / "c" / "demo_object").mkdir(parents=True)
    (tmp_path / "c" / "demo_object" / "mine.txt").write_text("keep")
    with pytest.raises(PatchbankError, match="not a synthetic set"):
        write_synthetic_set(demo, "demo_object", tmp_path / "c", overwrite=True)
    with pytest.raises(PatchbankError, match="outside the dataset"):
        write_synthetic_set(demo, "demo_object", demo / "val")


def test_every_stage_runs_on_a_synthetic_set(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "val"
    write_synthetic_set(demo, "demo_texture", out, holdout=0.5, seed=0)
    spec = ExtractSpec("efficientnet_lite0", "random", image_size=64)
    board = run_pipeline(out, "demo_texture", [spec], ["knn"], banks_dir=tmp_path / "banks",
                         scores_dir=tmp_path / "scores", device="cpu", figures=False,
                         holdout=0.0)
    assert len(board) == 1
    metrics = pd.read_csv(next((tmp_path / "scores").glob("*/*/metrics.csv")))
    row = metrics[metrics["category"] == "demo_texture"].iloc[0]
    assert 0.0 <= row["image_auroc"] <= 1.0 and not math.isnan(row["pixel_auroc"])
    scores = pd.read_csv(next((tmp_path / "scores").glob("*/*/demo_texture/image_scores.csv")))
    assert len(scores) == 2 + 2 * len(GENERATORS) and scores["label"].sum() == 12
