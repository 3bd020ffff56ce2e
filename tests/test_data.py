"""Dataset layer: discovery, decoding, masks, hashing, transforms and every user error."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from patchbank.core.errors import DatasetError
from patchbank.data.demo import make_demo_dataset
from patchbank.data.mvtec import (
    ImageDataset,
    Sample,
    discover,
    files_hash,
    has_masks,
    list_categories,
    load_image,
    load_mask,
    resolve_categories,
)
from patchbank.features.preprocess import Preprocess

N_TRAIN, N_GOOD, N_DEFECT, SIZE = 5, 3, 2, 64
REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec_ad"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(
        root, size=SIZE, n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT, seed=3
    )


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private, mutable copy of the demo dataset (for the error cases)."""
    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def _png(path: Path, size: tuple[int, int] = (16, 12), value: int = 100, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value,) * 3
    Image.new(mode, size, fill).save(path)
    return path


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# --------------------------------------------------------------------------- discovery


def test_discover_demo_counts_labels_masks_and_order(demo_root: Path) -> None:
    assert list_categories(demo_root) == ["demo_crack", "demo_object", "demo_texture"]
    for cat in ["demo_object", "demo_texture"]:  # square RGB ones (demo_crack: test_demo.py)
        assert has_masks(demo_root, cat)
        train = discover(demo_root, cat, "train")
        assert len(train) == N_TRAIN
        assert {(s.split, s.defect_type, s.label, s.mask_path) for s in train} == {
            ("train", "good", 0, None)
        }
        test = discover(demo_root, cat, "test")
        assert Counter(s.defect_type for s in test) == {
            "good": N_GOOD,
            "hole": N_DEFECT,
            "scratch": N_DEFECT,
            "stain": N_DEFECT,
        }
        assert Counter(s.label for s in test) == {0: N_GOOD, 1: 3 * N_DEFECT}
        # sorted by (defect_type, file name) and identical on a second call
        assert [(s.defect_type, s.path.name) for s in test] == sorted(
            (s.defect_type, s.path.name) for s in test
        )
        assert discover(demo_root, cat, "test") == test
        for s in test:
            assert s.category == cat and s.split == "test"
            if s.label == 0:
                assert s.mask_path is None
                continue
            assert s.mask_path == (
                demo_root / cat / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
            )
            img = load_image(s.path)
            mask = load_mask(s.mask_path, img.size)
            assert img.size == (SIZE, SIZE) and mask.shape == (SIZE, SIZE)
            assert mask.dtype == bool and 0 < mask.sum() < mask.size


def test_resolve_categories(demo_root: Path) -> None:
    assert resolve_categories(demo_root, "all") == ["demo_crack", "demo_object", "demo_texture"]
    assert resolve_categories(demo_root, "demo_texture") == ["demo_texture"]
    assert resolve_categories(demo_root, " demo_texture, demo_object,demo_texture") == [
        "demo_texture",
        "demo_object",
    ]
    with pytest.raises(DatasetError) as err:
        resolve_categories(demo_root, "demo_texture,carpet")
    msg = _one_line_naming(err, demo_root / "carpet")
    assert "demo_object, demo_texture" in msg


def test_dataset_without_ground_truth_and_extensions(tmp_path: Path) -> None:
    cat = tmp_path / "widget"
    (cat / "train" / "good").mkdir(parents=True)
    for name in ("b.PNG", "a.jpg", "c.TIFF", "d.bmp"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(cat / "train" / "good" / name)
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    _png(cat / "train" / "good" / ".hidden.png")
    _png(cat / "test" / "good" / "000.png")
    _png(cat / "test" / "dent" / "000.jpeg")
    train = discover(tmp_path, "widget", "train")
    assert [s.path.name for s in train] == ["a.jpg", "b.PNG", "c.TIFF", "d.bmp"]
    test = discover(tmp_path, "widget", "test")
    assert [(s.defect_type, s.label, s.mask_path) for s in test] == [
        ("dent", 1, None),
        ("good", 0, None),
    ]
    assert not has_masks(tmp_path, "widget")


# --------------------------------------------------------------------------- errors


def test_error_data_root_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for call in (
        lambda: list_categories(missing),
        lambda: resolve_categories(missing, "all"),
        lambda: discover(missing, "bottle", "train"),
    ):
        with pytest.raises(DatasetError) as err:
            call()
        assert "--data-root" in _one_line_naming(err, missing)


def test_error_unknown_category_lists_available(demo_root: Path) -> None:
    with pytest.raises(DatasetError) as err:
        discover(demo_root, "carpet", "train")
    msg = _one_line_naming(err, demo_root / "carpet")
    assert "demo_object, demo_texture" in msg


def test_error_missing_and_empty_train_good(demo_copy: Path) -> None:
    good = demo_copy / "demo_object" / "train" / "good"
    for p in good.iterdir():
        p.unlink()
    with pytest.raises(DatasetError) as err:
        discover(demo_copy, "demo_object", "train")
    assert "no images" in _one_line_naming(err, good)
    good.rmdir()
    with pytest.raises(DatasetError) as err:
        discover(demo_copy, "demo_object", "test")
    assert "expected MVTec layout" in _one_line_naming(err, good)


def test_error_empty_test_folder(demo_copy: Path) -> None:
    folder = demo_copy / "demo_texture" / "test" / "hole"
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(DatasetError) as err:
        discover(demo_copy, "demo_texture", "test")
    _one_line_naming(err, folder)


def test_error_missing_mask_names_expected_path(demo_copy: Path) -> None:
    mask = demo_copy / "demo_texture" / "ground_truth" / "stain" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError) as err:
        discover(demo_copy, "demo_texture", "test")
    msg = _one_line_naming(err, mask)
    assert str(demo_copy / "demo_texture" / "test" / "stain" / "001.png") in msg


def test_error_mask_size_differs(demo_copy: Path) -> None:
    mask = demo_copy / "demo_object" / "ground_truth" / "scratch" / "000_mask.png"
    Image.new("L", (SIZE + 1, SIZE), 255).save(mask)
    with pytest.raises(DatasetError) as err:
        discover(demo_copy, "demo_object", "test")
    msg = _one_line_naming(err, mask)
    assert f"{SIZE + 1}x{SIZE}" in msg and f"{SIZE}x{SIZE}" in msg
    with pytest.raises(DatasetError) as err:
        load_mask(mask, (SIZE, SIZE))
    _one_line_naming(err, mask)


def test_error_truncated_and_fake_images(demo_copy: Path) -> None:
    real = demo_copy / "demo_object" / "test" / "hole" / "000.png"
    data = real.read_bytes()
    truncated = demo_copy / "demo_object" / "train" / "good" / "000.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        load_image(truncated)
    assert "re-download or remove" in _one_line_naming(err, truncated)

    text = demo_copy / "demo_object" / "train" / "good" / "001.png"
    text.write_text("this is not a png\n")
    with pytest.raises(DatasetError) as err:
        load_image(text)
    assert "cannot read image" in _one_line_naming(err, text)
    with pytest.raises(DatasetError) as err:
        load_mask(text)
    _one_line_naming(err, text)

    # a fake defective test image is caught while discovery reads headers for the mask check
    real.write_text("not an image either")
    with pytest.raises(DatasetError) as err:
        discover(demo_copy, "demo_object", "test")
    _one_line_naming(err, real)


def test_image_dataset_and_loader_errors(demo_copy: Path) -> None:
    samples = discover(demo_copy, "demo_texture", "train")
    ds = ImageDataset(samples, Preprocess(32, MEAN, STD))
    x, idx = ds[2]
    assert len(ds) == N_TRAIN and idx == 2 and x.shape == (3, 32, 32)
    batch, index = next(iter(DataLoader(ds, batch_size=N_TRAIN)))
    assert batch.shape == (N_TRAIN, 3, 32, 32) and index.tolist() == list(range(N_TRAIN))

    samples[3].path.write_bytes(samples[3].path.read_bytes()[:100])
    with pytest.raises(DatasetError) as err:
        ds[3]
    _one_line_naming(err, samples[3].path)
    loader = DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(DatasetError, match=str(samples[3].path)):
        list(loader)


# --------------------------------------------------------------------------- decoding


def test_load_image_grayscale_16bit_rgba_palette_cmyk(tmp_path: Path) -> None:
    gray = Image.fromarray(np.array([[0, 7, 200, 255]], dtype=np.uint8))
    gray.save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.repeat(np.array([[0, 7, 200, 255]])[..., None], 3, 2))

    values = np.array([[0, 257, 32896, 65535, 65534]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 255]
    assert (out == out[..., :1]).all()

    wide = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))  # mode "I"
    wide.save(tmp_path / "g32.tif")
    assert np.asarray(load_image(tmp_path / "g32.tif"))[0, :, 1].tolist() == [0, 128, 255]

    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB" and np.asarray(out).tolist() == [[[10, 20, 30], [200, 100, 50]]]

    Image.fromarray(np.array([[[9, 99, 199]]], dtype=np.uint8)).convert("LA").save(
        tmp_path / "la.png"
    )
    assert np.asarray(load_image(tmp_path / "la.png")).shape == (1, 1, 3)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png")
    assert np.asarray(load_image(tmp_path / "pal.png")).tolist() == [[[0, 0, 0], [255, 0, 0]]]

    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif")
    assert out.mode == "RGB" and (np.asarray(out) == 255).all()


def test_load_mask_modes(tmp_path: Path) -> None:
    arr = np.array([[0, 255, 0], [1, 0, 0]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    expected = arr > 0
    assert np.array_equal(load_mask(tmp_path / "m.png"), expected)
    assert np.array_equal(load_mask(tmp_path / "m.png", (3, 2)), expected)
    Image.fromarray(arr).convert("1").save(tmp_path / "m1.png")
    assert load_mask(tmp_path / "m1.png").tolist() == [[False, True, False], [False, False, False]]
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[1, 2, 2] = 1  # a dim blue pixel still counts as defect
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert load_mask(tmp_path / "rgb.png").sum() == 1 and load_mask(tmp_path / "rgb.png")[1, 2]
    with pytest.raises(DatasetError) as err:
        load_mask(tmp_path / "absent_mask.png")
    _one_line_naming(err, tmp_path / "absent_mask.png")


# --------------------------------------------------------------------------- transforms


def test_preprocess_shape_and_normalisation() -> None:
    img = Image.new("RGB", (50, 30), (128, 64, 255))  # non-square: no crop, stretched
    x = Preprocess(32, MEAN, STD)(img)
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x, expected[:, None, None].expand(3, 32, 32), atol=1e-5)
    assert Preprocess(32, MEAN, STD, crop=24)(img).shape == (3, 24, 24)
    with pytest.raises(ValueError):
        Preprocess(32, MEAN, STD, crop=40)


@pytest.mark.parametrize("crop", [None, 48])
def test_preprocess_equals_the_torchvision_pipeline(crop: int | None) -> None:
    """Resize in workers + normalise on the device = torchvision's one-image pipeline, so banks
    keep their values whether pixels come from images or from the image cache."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8))
    steps = [v2.Resize((64, 64), antialias=True)] + ([v2.CenterCrop(crop)] if crop else [])
    reference = v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(MEAN, STD)])(img)
    pre = Preprocess(64, MEAN, STD, crop=crop)
    pixels = pre.resize(img)
    assert pixels.dtype == torch.uint8 and pixels.shape == (64, 64, 3)
    torch.testing.assert_close(pre(img), reference.as_subclass(torch.Tensor), rtol=0, atol=1e-6)
    batch = pre.batch(torch.stack([pixels, pixels.flip(0)]))
    assert batch.shape == (2, 3, crop or 64, crop or 64)
    torch.testing.assert_close(batch[0], pre(img))


def test_preprocess_keeps_borders() -> None:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :4] = 255  # a bright defect touching the left border
    x = Preprocess(32, (0, 0, 0), (1, 1, 1))(Image.fromarray(arr))
    assert torch.allclose(x[:, :, 0], torch.ones(3, 32), atol=1e-6)  # still there, full strength
    assert torch.allclose(x[:, :, 3:], torch.zeros(3, 32, 29), atol=1e-6)
    cropped = Preprocess(32, (0, 0, 0), (1, 1, 1), crop=24)(Image.fromarray(arr))
    assert cropped.max() == 0  # the centre crop removes the border defect


# --------------------------------------------------------------------------- hashing


def test_files_hash_stable_and_sensitive(demo_copy: Path) -> None:
    samples = discover(demo_copy, "demo_object", "test")
    h = files_hash(samples, demo_copy)
    assert len(h) == 64 and h == files_hash(discover(demo_copy, "demo_object", "test"), demo_copy)
    assert h == files_hash(list(reversed(samples)), demo_copy)  # order-independent

    mask = next(s.mask_path for s in samples if s.mask_path is not None)
    st = os.stat(mask)
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touch
    touched = files_hash(samples, demo_copy)
    assert touched != h
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files_hash(samples, demo_copy) == h  # back to the same stat -> same hash

    img = samples[-1].path
    st = os.stat(img)
    img.write_bytes(img.read_bytes() + b"\0")  # content (size) changes
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files_hash(samples, demo_copy) not in (h, touched)

    extra = Sample(_png(demo_copy / "x.png"), "demo_object", "test", "good", 0, None)
    assert files_hash([*samples, extra], demo_copy) != files_hash(samples, demo_copy)


# --------------------------------------------------------------------------- real data


@pytest.fixture
def bottle_root() -> Path:
    if not (REAL_ROOT / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real MVTec AD bottle not found at {REAL_ROOT / 'bottle'}")
    return REAL_ROOT


@pytest.mark.real_data
def test_real_bottle_discovery(bottle_root: Path) -> None:
    real_root = bottle_root
    assert "bottle" in list_categories(real_root)
    train = discover(real_root, "bottle", "train")
    test = discover(real_root, "bottle", "test")  # also checks all 63 mask sizes
    assert len(train) == 209 and len(test) == 83
    assert has_masks(real_root, "bottle")
    assert sum(s.mask_path is not None for s in test) == 63
    assert all(s.mask_path.is_file() for s in test if s.label == 1)
    assert Counter(s.label for s in test) == {0: 20, 1: 63}
    assert Counter(s.defect_type for s in test) == {
        "good": 20,
        "broken_large": 20,
        "broken_small": 22,
        "contamination": 21,
    }
    assert files_hash(test, real_root) == files_hash(test, real_root)
    s = next(s for s in test if s.defect_type == "contamination")
    img = load_image(s.path)
    mask = load_mask(s.mask_path, img.size)
    assert img.size == (900, 900) and mask.shape == (900, 900) and 0 < mask.mean() < 0.5
