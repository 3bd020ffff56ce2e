"""--augment N at extraction: spec tags, seeded ops, augmented train banks that stream, mark
their copies and are read by the score stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from patchbank.cli.stages import extract_main
from patchbank.core.errors import PatchbankError
from patchbank.data.demo import make_demo_dataset
from patchbank.features.augment import Augmenter, augment_image, parse_ops
from patchbank.features.spec import ExtractSpec
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.stages.pipeline import run_pipeline
from patchbank.store.banks import extract_command, load_bank, load_pair


def test_augment_zero_keeps_the_tags_of_existing_banks() -> None:
    # tags computed before ExtractSpec had augment fields: existing caches stay valid
    assert ExtractSpec("efficientnet_lite0").tag() == "s224-l1.2.3-half-hub-5618081a"
    assert ExtractSpec("efficientnet_lite0", "random", image_size=64).tag() == \
        "s64-l1.2.3-half-random-c461e7ca"
    assert ExtractSpec("resnet18", "hub", (1, 2), 256, 224, "imagenet").tag() == \
        "s256c224-l1.2-imagenet-hub-6594b38e"
    plain = ExtractSpec("efficientnet_lite0")
    assert "augment" not in plain.canonical()
    assert ExtractSpec("efficientnet_lite0", augment_ops="rot8").tag() == plain.tag()
    aug = ExtractSpec("efficientnet_lite0", augment=4)
    assert aug.tag().startswith("s224-l1.2.3-half-hub-aug4-") and aug.tag() != plain.tag()
    assert aug.canonical()["augment_ops"] == "scale,blur,noise,jitter"
    assert ExtractSpec("efficientnet_lite0", augment=4, augment_ops="rot8").tag() != aug.tag()
    with pytest.raises(PatchbankError, match="--augment-ops 'twirl'"):
        ExtractSpec("efficientnet_lite0", augment=2, augment_ops="twirl")
    with pytest.raises(PatchbankError, match="--augment -1"):
        ExtractSpec("efficientnet_lite0", augment=-1)


def _asym(size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def test_augment_ops_are_seeded_by_row_and_copy() -> None:
    img = _asym()
    ops = parse_ops("flip,rot90,scale,blur,noise,jitter")
    a = augment_image(img, ops, row=3, copy=1)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, augment_image(img, ops, row=3, copy=1))
    assert not np.array_equal(a, augment_image(img, ops, row=3, copy=2))
    assert not np.array_equal(a, augment_image(img, ops, row=4, copy=1))
    # the dihedral copies 1..7 are the 7 distinct non-identity symmetries of the square
    dihedral = [augment_image(img, ("dihedral",), 0, k) for k in range(1, 8)]
    expected = [np.rot90(img, r, axes=(0, 1))[:, ::f] for f in (1, -1) for r in range(4)][1:]
    assert sorted(d.tobytes() for d in dihedral) == sorted(e.tobytes() for e in expected)
    # rot8 (AnomalyDINO): copy k is turned by 45 * k degrees; 4 copies -> 180 degrees exactly
    assert np.array_equal(augment_image(img, ("rot8",), 0, 4), img[::-1, ::-1])
    bright = np.maximum(img, 1)  # no black pixel anywhere
    turned = augment_image(bright, ("rot8",), 0, 1)
    assert turned.min() >= 1  # corners filled by reflection, not black (cv2 BORDER_DEFAULT)
    assert np.array_equal(turned[16, 16], augment_image(bright, ("rot8",), 0, 1)[16, 16])
    # 90 degrees counter-clockwise: the top row becomes the left column
    np.testing.assert_array_equal(augment_image(bright, ("rot8",), 0, 2), np.rot90(bright))
    with pytest.raises(PatchbankError, match="positive"):
        Augmenter(0)


def test_augmenter_interleaves_rows() -> None:
    aug = Augmenter(2, "flip")
    pixels = np.stack([_asym(), _asym()[::-1]])
    out, rows = aug.expand(pixels, np.array([5, 6]))
    assert out.shape == (6, 32, 32, 3) and rows.tolist() == list(range(15, 21))
    assert np.array_equal(out[0], pixels[0]) and np.array_equal(out[3], pixels[1])
    assert aug.meta_columns(2) == {"augment": [0, 1, 2, 0, 1, 2], "augment_of": [0, 0, 0, 3, 3, 3]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", size=64, n_train=5,
                             n_test_good=2, n_test_defect=1)


def test_augmented_train_bank(demo, tmp_path) -> None:
    banks = tmp_path / "banks"
    plain = ExtractSpec("efficientnet_lite0", "random", image_size=64)
    aug = ExtractSpec("efficientnet_lite0", "random", image_size=64, augment=2,
                      augment_ops="flip,noise")
    extract(demo, ["demo_crack"], ExtractConfig(plain, batch_size=2, device="cpu"), banks)
    extract(demo, ["demo_crack"], ExtractConfig(aug, batch_size=3, device="cpu"), banks)
    p_train, p_test = load_pair(banks, "efficientnet_lite0", plain.tag(), "demo_crack")
    a_train, a_test = load_pair(banks, "efficientnet_lite0", aug.tag(), "demo_crack")
    assert len(p_train) == 5 and len(a_train) == 15 and len(a_test) == len(p_test) == 4
    assert a_train.fingerprint["n_images"] == 15 and a_train.fingerprint["spec"]["augment"] == 2
    meta = a_train.meta
    assert list(meta.columns[-2:]) == ["augment", "augment_of"]
    assert meta["augment"].tolist() == [0, 1, 2] * 5
    assert meta["augment_of"].tolist() == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9, 12, 12, 12]
    assert (meta["path"].to_numpy()[::3] == p_train.meta["path"].to_numpy()).all()
    assert "augment" not in p_train.meta.columns and "augment" not in a_test.meta.columns
    for layer in p_train.taps:
        orig = np.asarray(a_train.taps[layer][::3], dtype=np.float32)
        assert np.allclose(orig, np.asarray(p_train.taps[layer], dtype=np.float32), atol=2e-2)
        assert np.allclose(np.asarray(a_test.taps[layer], dtype=np.float32),
                           np.asarray(p_test.taps[layer], dtype=np.float32), atol=2e-2)
        copies = np.asarray(a_train.taps[layer][1::3], dtype=np.float32)
        assert not np.allclose(copies, orig, atol=2e-2)
    # the same copies again: through the command line, without the image cache, other batches
    extract_main(["--backbone", "efficientnet_lite0", "--weights", "random", "--image-size",
                  "64", "--data-root", str(demo), "--category", "demo_crack", "--banks-dir",
                  str(tmp_path / "nocache"), "--augment", "2", "--augment-ops", "flip,noise",
                  "--no-image-cache", "--batch-size", "4", "--device", "cpu"])
    again = load_bank(tmp_path / "nocache", "efficientnet_lite0", aug.tag(), "demo_crack",
                      "train")
    for layer in a_train.taps:
        assert np.allclose(np.asarray(again.taps[layer], dtype=np.float32),
                           np.asarray(a_train.taps[layer], dtype=np.float32), atol=2e-2)
    assert "--augment 2 --augment-ops flip,noise" in extract_command(
        banks, "efficientnet_lite0", aug.tag(), "demo_crack")


def test_score_and_evaluate_read_augmented_banks(demo, tmp_path) -> None:
    spec = ExtractSpec("efficientnet_lite0", "random", image_size=64, augment=1)
    board = run_pipeline(demo, "demo_object", [spec], ["knn", "padim"],
                         banks_dir=tmp_path / "banks", scores_dir=tmp_path / "scores",
                         device="cpu", figures=False, holdout=0.0)
    assert len(board) == 2 and board["image_auroc"].between(0, 1).all()
    train = pd.read_csv(next((tmp_path / "banks").glob("*/*/demo_object/train.csv")))
    assert len(train) == 10 and train["augment"].sum() == 5
