"""Decoded-image cache: filled on the first extraction, reused by later ones, never stale."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import patchbank.data.mvtec
from patchbank.core.atomic import hostname
from patchbank.data.demo import make_demo_dataset
from patchbank.data.mvtec import discover, load_image
from patchbank.features.preprocess import Preprocess
from patchbank.features.spec import ExtractSpec
from patchbank.stages.extract import IMAGE_CACHE_DIR, ExtractConfig, Extractor
from patchbank.store.banks import load_bank
from patchbank.store.imagecache import ImageCache

SPEC = ExtractSpec("efficientnet_lite0", weights="random", image_size=64)
SMALL = ExtractConfig(SPEC, batch_size=4, num_workers=1)
CATEGORY = "demo_texture"


def with_spec(config: ExtractConfig, **changes) -> ExtractConfig:
    return replace(config, spec=replace(config.spec, **changes))


def bank(banks: Path, config: ExtractConfig, split: str):
    spec = config.spec
    return load_bank(banks, spec.backbone, spec.tag(), CATEGORY, split)


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
        meta = bank(tmp_path, SMALL, split).meta
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
    Extractor(with_spec(SMALL, backbone="resnet18")).run(demo, CATEGORY, cached)  # fills it
    _no_decoding(monkeypatch)
    with caplog.at_level("INFO", logger="patchbank.stages.extract"):
        done = Extractor(SMALL).run(demo, CATEGORY, cached)
    assert done == {"train": "built", "test": "built"}
    assert caplog.text.count("read from the cache") == 2
    for split in ("train", "test"):
        a, b = bank(uncached, SMALL, split), bank(cached, SMALL, split)
        assert a.layers == b.layers
        for layer in a.layers:
            np.testing.assert_array_equal(a.taps[layer], b.taps[layer])
        assert a.fingerprint == b.fingerprint  # the cache is not part of the bank's identity


def test_crop_and_normalisation_reuse_the_same_pixels(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Extractor(SMALL).run(demo, CATEGORY, tmp_path)
    _no_decoding(monkeypatch)
    cropped = with_spec(SMALL, crop=48, normalize="imagenet")
    assert Extractor(cropped).run(demo, CATEGORY, tmp_path) == {"train": "built",
                                                               "test": "built"}
    # the model sees 48 px instead of 64: every grid shrinks by 3/4 (same pixels, cropped)
    full, crop = bank(tmp_path, SMALL, "train"), bank(tmp_path, cropped, "train")
    assert crop.grid == tuple(g * 48 // 64 for g in full.grid) and crop.grid[0] > 0


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
    Extractor(with_spec(SMALL, image_size=32)).run(demo, CATEGORY, tmp_path)
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

    # temporaries of dead writers are swept by the next writer: on this host when the
    # process is gone, from another host (or an older patchbank) only after a day
    folder = cache.npy.parent
    dead = folder / f".{cache.npy.name}.{hostname()}.999999999.0a0b.tmp"
    mine = folder / f".{cache.npy.name}.{hostname()}.{os.getpid()}.0a0b.tmp"
    other_new = folder / f".{cache.npy.name}.not-{hostname()}.1.0a0b.tmp"
    other_old = folder / f".{cache.json.name}.not-{hostname()}.2.0a0b.tmp"
    legacy_old = folder / f".{cache.npy.stem}.4242.npy"
    for p in (dead, mine, other_new, other_old, legacy_old):
        p.write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    for p in (other_old, legacy_old):
        os.utime(p, (day_ago, day_ago))
    Extractor(SMALL).run(demo, CATEGORY, tmp_path)
    assert cache.load() is not None
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == \
        sorted([mine.name, other_new.name])

    cache.npy.write_bytes(cache.npy.read_bytes()[:1000])  # truncated
    with caplog.at_level("WARNING", logger="patchbank.store.imagecache"):
        assert cache.load() is None
        Extractor(SMALL).run(demo, CATEGORY, tmp_path, overwrite=True)
    assert "unreadable image cache" in caplog.text
    assert cache.load().shape == (6, 64, 64, 3)
