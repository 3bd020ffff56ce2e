"""The README's CONTRIBUTING recipe "Add a backbone family", followed literally with a toy
family: a tiny random conv net, registered, extracted into banks, read back, unregistered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from patchbank.core.errors import WeightsError
from patchbank.features.extractors import build_extractor
from patchbank.features.families import FAMILIES, register_family, unregister_family
from patchbank.features.families.base import BackboneFamily, FeatureExtractor
from patchbank.features.preprocess import Preprocess
from patchbank.features.registry import HALF, REGISTRY, BackboneSpec
from patchbank.features.spec import ExtractSpec
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.store.banks import load_bank

SEED = 3


# Step 1: the family's module (here inline): an extractor, a builder, a FAMILY record.
class ToyExtractor(FeatureExtractor):
    """Block i of a small conv net is layer i (block 0: stride 2, block 1: stride 4)."""

    def __init__(self, blocks: nn.Sequential, image_size: int, layers: tuple[int, ...]) -> None:
        super().__init__(blocks, image_size)
        self.layers = layers

    def taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, block in enumerate(self.model):
            x = block(x)
            if i in self.layers:
                out.append(x)
        return out


def build_toy(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
              image_size: int) -> tuple[FeatureExtractor, str]:
    """Two conv blocks (3 -> 4 -> 6 channels), cut after the last tapped one."""
    TOY_FAMILY.check_layers(spec, layers, 2)
    torch.manual_seed(SEED)
    blocks = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU()),
                           nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU()))
    return ToyExtractor(blocks[: max(layers) + 1], image_size, layers), f"random:seed{SEED}"


TOY_FAMILY = BackboneFamily(name="toy_conv", build=build_toy, weight_kinds=frozenset({"random"}),
                            tap_name="conv blocks",
                            weights_fix="a toy net has only random weights; use --weights random")


def _mvtec_folder(root: Path) -> Path:
    """<root>/widget in the MVTec layout: 3 train images, 2 test (one defective, with a mask)."""
    rng = np.random.default_rng(0)
    cat = root / "widget"
    files = ["train/good/000.png", "train/good/001.png", "train/good/002.png",
             "test/good/000.png", "test/crack/000.png"]
    for rel in files:
        (cat / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(cat / rel)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(mask).save(cat / "ground_truth" / "crack" / "000_mask.png")
    return cat


def test_add_a_backbone_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Step 2: the registry line.
    register_family(TOY_FAMILY)
    try:
        # Step 3: a backbone of the family in REGISTRY (its default taps, size, normalisation).
        monkeypatch.setitem(REGISTRY, "toy", BackboneSpec(
            "toy", "toy_conv", "toy-conv", (0, 1), 32, HALF, HALF, None, "none: a random toy net"))
        with pytest.raises(WeightsError, match="only random weights"):
            build_extractor("toy", weights="hub")
        with pytest.raises(WeightsError, match="valid conv blocks are 0..1"):
            build_extractor("toy", weights="random", layers=(2,))

        # Step 4: extract through the stage and read the banks back.
        cat = _mvtec_folder(tmp_path / "data")
        spec = ExtractSpec("toy", weights="random")
        config = ExtractConfig(spec, batch_size=2, num_workers=0, device="cpu",
                               image_cache=False)
        extract(tmp_path / "data", ["widget"], config, tmp_path / "banks")
        train = load_bank(tmp_path / "banks", "toy", spec.tag(), "widget", "train")
        test = load_bank(tmp_path / "banks", "toy", spec.tag(), "widget", "test")
        assert train.layers == (0, 1) and len(train) == 3 and len(test) == 2
        assert train.taps[0].shape == (3, 16, 16, 4) and train.taps[1].shape == (3, 8, 8, 6)
        assert train.taps[0].dtype == np.float16
        assert train.fingerprint["weights"] == f"random:seed{SEED}"
        assert test.meta["label"].tolist() == [1, 0]  # crack, then good

        # The banks hold the toy net's taps of the resized, normalised images.
        model, info = build_extractor("toy", weights="random")
        pre = Preprocess(info.image_size, info.mean, info.std)
        with Image.open(cat / "train/good/001.png") as img:
            x = pre(img.convert("RGB"))[None]
        with torch.inference_mode():
            want = [m[0].permute(1, 2, 0).numpy() for m in model.grids(x)]
        row = int(np.flatnonzero(train.meta["path"].astype(str).str.endswith("001.png"))[0])
        for layer, expected in zip((0, 1), want, strict=True):
            np.testing.assert_allclose(np.asarray(train.taps[layer][row], np.float32), expected,
                                       rtol=1e-2, atol=1e-3)
    finally:
        # Step 5 (tests only): unregister; the backbone is then refused with a fix.
        unregister_family("toy_conv")
    assert "toy_conv" not in FAMILIES
    with pytest.raises(WeightsError, match="unknown backbone family 'toy_conv'"):
        build_extractor("toy", weights="random")
