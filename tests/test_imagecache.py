"""Decoded-image cache: filled on the first extraction, reused by later ones, never stale."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import patchbank.data.mvtec
from patchbank.data.demo import make_demo_dataset
from patchbank.data.mvtec import discover, load_image
from patchbank.features.preprocess import Preprocess
from patchbank.stages.extract import IMAGE_CACHE_DIR, ExtractConfig, Extractor
from patchbank.store.banks import load_bank
from patchbank.store.imagecache import ImageCache

SMALL = ExtractConfig("efficientnet_lite0", weights="random", image_size=64, batch_size=4,
                      num_workers=1)
CATEGORY = "demo_texture"


@pytest.fixture
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), size=80, n_train=6,
                             n_test_good=2, n_test_defect=1)


def _cache(root: Path, banks: Path, split: str = "train", size: int = 64) -> ImageCache:
    return ImageCache.of(banks / IMAGE_CACHE_DIR, root, discover(root, CATEGORY, split), size)


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> None:
        raise AssertionError(f"decoded {path} although its pixels are cached")

    monkeypatch.setattr(patchbank.data.mvtec, "load_image", refuse)


def test_cache_holds_the_resized_images_in_bank_order(demo: Path, tmp_path: Path) -> None:
    Extractor(SMALL).run(demo, CATEGORY, tmp_path)
    for split in ("train", "test"):
        cache = _cache(demo, tmp_path, split)
        assert cache.npy == tmp_path / "_imagecache" / CATEGORY / f"{split}-64px.npy"
        pixels = cache.load()
        samples = discover(demo, CATEGORY, split)
        meta = load_bank(tmp_path, "efficientnet_lite0", CATEGORY, split).meta
        assert meta["path"].tolist() == [str(s.path) for s in samples]
        assert pixels.shape == (len(samples), 64, 64, 3) and pixels.dtype == np.uint8
        resize = Preprocess(64, (0.5,) * 3, (0.5,) * 3).resize
        for i, s in enumerate(samples):
            np.testing.assert_array_equal(pixels[i], resize(load_image(s.path)).numpy())
        key = json.loads(cache.json.read_text())
        assert key["image_size"] == 64 and len(key["paths"]) == len(samples)


def test_second_backbone_reads_the_cache_and_gets_identical_banks(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    uncached = tmp_path / "uncached"
    Extractor(replace(SMALL, image_cache=False)).run(demo, CATEGORY, uncached)
    assert not (uncached / IMAGE_CACHE_DIR).exists()

    cached = tmp_path / "cached"
    Extractor(replace(SMALL, backbone="resnet18")).run(demo, CATEGORY, cached)  # fills it
    _no_decoding(monkeypatch)
    with caplog.at_level("INFO", logger="patchbank.stages.extract"):
        done = Extractor(SMALL).run(demo, CATEGORY, cached)
    assert done == {"train": "built", "test": "built"}
    assert caplog.text.count("read from the cache") == 2
    for split in ("train", "test"):
        a = load_bank(uncached, "efficientnet_lite0", CATEGORY, split)
        b = load_bank(cached, "efficientnet_lite0", CATEGORY, split)
        np.testing.assert_array_equal(a.features, b.features)
        assert a.fingerprint == b.fingerprint  # the cache is not part of the bank's identity


def test_crop_and_normalisation_reuse_the_same_pixels(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Extractor(SMALL).run(demo, CATEGORY, tmp_path)
    _no_decoding(monkeypatch)
    ext = Extractor(replace(SMALL, crop=48, normalize="imagenet"))
    assert ext.run(demo, CATEGORY, tmp_path) == {"train": "rebuilt", "test": "rebuilt"}
    bank = load_bank(tmp_path, "efficientnet_lite0", CATEGORY, "train")
    assert bank.features.shape[1:3] == (6, 6)  # 48 px crop -> stride-8 grid


def test_changed_image_or_size_is_not_served_from_the_cache(demo: Path, tmp_path: Path,
                                                            caplog) -> None:
    Extractor(SMALL).run(demo, CATEGORY, tmp_path)
    img = discover(demo, CATEGORY, "train")[2].path
    arr = np.asarray(load_image(img)).copy()
    arr[:20] = 255
    from PIL import Image

    Image.fromarray(arr).save(img)
    with caplog.at_level("INFO", logger="patchbank.store.imagecache"):
        assert Extractor(SMALL).run(demo, CATEGORY, tmp_path)["train"] == "rebuilt"
    assert "image cache is stale" in caplog.text
    pixels = _cache(demo, tmp_path).load()
    assert pixels is not None and (pixels[2, :10] == 255).all()  # the new content

    # another image size has its own cache file; both stay valid
    Extractor(replace(SMALL, image_size=32)).run(demo, CATEGORY, tmp_path)
    assert _cache(demo, tmp_path, size=32).load().shape[1:] == (32, 32, 3)
    assert _cache(demo, tmp_path, size=64).load() is not None

    # a changed mask does not touch the pixels
    mask = next(s.mask_path for s in discover(demo, CATEGORY, "test") if s.mask_path)
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _cache(demo, tmp_path, "test").load() is not None


def test_unfinished_or_corrupt_cache_is_never_used(demo: Path, tmp_path: Path, caplog) -> None:
    cache = _cache(demo, tmp_path)
    with cache.writer() as w:  # killed after one batch: nothing is published
        w.write(np.arange(2), np.zeros((2, 64, 64, 3), np.uint8))
        w.commit()
    assert not cache.npy.exists() and not cache.json.exists() and cache.load() is None
    assert list(cache.npy.parent.iterdir()) == []

    # a temporary file left by a dead process is swept by the next writer
    dead = cache.npy.with_name(f".{cache.npy.stem}.999999999.npy")
    dead.write_bytes(b"partial")
    Extractor(SMALL).run(demo, CATEGORY, tmp_path)
    assert not dead.exists() and cache.load() is not None

    cache.npy.write_bytes(cache.npy.read_bytes()[:1000])  # truncated
    with caplog.at_level("WARNING", logger="patchbank.store.imagecache"):
        assert cache.load() is None
        Extractor(SMALL).run(demo, CATEGORY, tmp_path, overwrite=True)
    assert "unreadable image cache" in caplog.text
    assert cache.load().shape == (6, 64, 64, 3)
