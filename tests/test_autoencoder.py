"""Autoencoder scorers (ae_features = DFR, ae_pixels), the pixels backbone and top-sigma k-NN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchbank.core.errors import BankError
from patchbank.features.spec import ExtractSpec
from patchbank.scorers import load_scorer, make_scorer
from patchbank.scorers.autoencoder import FeatureCAE, pca_latent, train_spans
from patchbank.scorers.knn import top_sigma_channels
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.store.banks import load_bank

FAST = {"max_epochs": 8, "lr": 1e-2, "batch_size": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _banks(seed: int = 0, n_train: int = 40, side: int = 8, channels: int = 16):
    """Normal features on a 4-dim subspace plus noise; test images 3.. get an off-subspace
    2x2 block at a known place. Returns train, test, {index: (row, col)}."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, channels))

    def sample(n: int) -> np.ndarray:
        codes = rng.normal(size=(n, side, side, 4))
        return (codes @ basis + 0.05 * rng.normal(size=(n, side, side, channels))).astype(
            np.float16)

    train, test = sample(n_train), sample(6)
    blocks = {}
    off = rng.normal(size=channels)
    off -= basis.T @ np.linalg.lstsq(basis.T, off, rcond=None)[0]  # orthogonal to the subspace
    off *= 12 / np.linalg.norm(off)  # typical normal vectors have norm ~8
    for i in range(3, 6):
        r, c = rng.integers(0, side - 1, size=2)
        test[i, r:r + 2, c:c + 2] += off.astype(np.float16)
        blocks[i] = (int(r), int(c))
    return train, test, blocks


def test_feature_cae_has_dfrs_widths_and_pca_latent_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    net = FeatureCAE(176, 20)
    widths = [(m.in_features, m.out_features) for m in net.modules()
              if isinstance(m, torch.nn.Linear)]
    assert widths == [(176, 108), (108, 40), (40, 20), (20, 40), (40, 108), (108, 176)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 4
    # kernel 1 = DFR's 1x1 convolutions: the same map as Conv2d with the same weights
    net.eval()
    x = torch.randn(2, 176, 3, 5)
    convs = [torch.nn.Conv2d(m.in_features, m.out_features, 1) for m in net.modules()
             if isinstance(m, torch.nn.Linear)]
    y = x
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d,
                                                         torch.nn.ReLU))]
    for m in layers:
        if isinstance(m, torch.nn.Linear):
            conv = convs.pop(0)
            conv.weight.data = m.weight.data[:, :, None, None]
            conv.bias.data = m.bias.data
            y = conv(y)
        elif isinstance(m, torch.nn.BatchNorm1d):
            y = (y - m.running_mean[:, None, None]) / torch.sqrt(m.running_var + m.eps)[
                :, None, None] * m.weight[:, None, None] + m.bias[:, None, None]
        else:
            y = torch.relu(y)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=1e-4, atol=1e-4)
    k3 = FeatureCAE(8, 2, kernel=3)
    assert [m.kernel_size for m in k3.modules() if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 6
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 12)) * np.linspace(3, 0.1, 12)
    assert pca_latent(x, 0.9) == PCA(n_components=0.9).fit(x).n_components_


@pytest.mark.parametrize("method", ["ae_features", "ae_pixels"])
def test_seeded_fit_is_deterministic(method: str) -> None:
    train, test, _ = _banks()
    if method == "ae_pixels":
        train, test = train[..., :3], test[..., :3]
    a = make_scorer(method, {**FAST, "seed": 3}, device="cpu").fit(train)
    b = make_scorer(method, {**FAST, "seed": 3}, device="cpu").fit(train)
    c = make_scorer(method, {**FAST, "seed": 4}, device="cpu").fit(train)
    sa, ma = a.score(test)
    sb, mb = b.score(test)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(ma, mb)
    assert a.history_ == b.history_
    assert not np.array_equal(sa, c.score(test)[0])


def test_early_stopping_stops_and_keeps_the_best_epoch() -> None:
    # Pure noise: nothing generalises to the held-out images, so the validation loss stops
    # improving after a few epochs while the training loss keeps falling.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20, 4, 4, 8)).astype(np.float16)
    params = {"max_epochs": 300, "patience": 3, "lr": 3e-2, "batch_size": 4, "latent": 6,
              "val_frac": 0.25}
    s = make_scorer("ae_features", params, device="cpu").fit(train)
    assert s.epochs_run_ < 300
    assert s.epochs_run_ == s.best_epoch_ + 3 == len(s.history_["val"])
    val = s.history_["val"]
    assert min(val) == val[s.best_epoch_ - 1] and all(v >= min(val) for v in val[s.best_epoch_:])
    # the kept weights are the best epoch's: recomputing the validation loss gives its value
    _, held = s._split(len(train))
    assert len(held) == 5
    np.testing.assert_allclose(s._errors(train[held]).mean() / 8, min(val), rtol=1e-5)
    # without a validation part it trains every epoch
    s0 = make_scorer("ae_features", {**params, "max_epochs": 7, "val_frac": 0.0},
                     device="cpu").fit(train)
    assert s0.epochs_run_ == 7 and s0.history_["val"] == []


def test_map_localises_a_planted_anomaly() -> None:
    train, test, blocks = _banks()
    s = make_scorer("ae_features", {"max_epochs": 60, "lr": 1e-2, "batch_size": 8},
                    device="cpu").fit(train)
    scores, maps = s.score(test)
    assert maps.shape == (6, 8, 8) and maps.dtype == np.float32
    assert scores.min() >= 0 and np.allclose(scores, maps.reshape(6, -1).max(axis=1))
    assert scores[3:].min() > scores[:3].max()
    for i, (r, c) in blocks.items():
        row, col = np.unravel_index(maps[i].argmax(), maps[i].shape)
        assert r <= row <= r + 1 and c <= col <= c + 1, (i, (row, col), (r, c))


def test_save_restore_round_trip(tmp_path: Path) -> None:
    train, test, _ = _banks()
    for method, params, tr, te in (
            ("ae_features", {**FAST, "standardize": True, "kernel": 3}, train, test),
            ("ae_pixels", {**FAST, "width": 4, "depth": 2}, train[:, :6, :6, :3],
             test[:, :6, :6, :3])):  # 6x6: padded to 8x8 and cropped back
        s = make_scorer(method, params, device="cpu").fit(tr)
        path = tmp_path / f"{method}.npz"
        s.save(path)
        with np.load(path, allow_pickle=False) as z:
            assert "arch" in z.files and any(k.startswith("net.") for k in z.files)
        back = load_scorer(path, device="cpu")
        assert type(back) is type(s) and back.params == s.params
        assert back.epochs_run_ == s.epochs_run_ and back.history_ == s.history_
        s1, m1 = s.score(te)
        s2, m2 = back.score(te)
        assert m1.shape == te.shape[:3]
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(m1, m2)


def test_a_one_cell_bottleneck_never_trains_batchnorm_on_one_image() -> None:
    # ae_pixels at depth 3 on an 8x8 grid has a 1x1 bottleneck, where training BatchNorm on a
    # batch of one image fails: a last batch of one joins the batch before it
    rng = np.random.default_rng(0)
    train = rng.normal(size=(9, 8, 8, 3)).astype(np.float16)
    params = {"max_epochs": 2, "batch_size": 8, "val_frac": 0.0, "width": 4}
    s = make_scorer("ae_pixels", params, device="cpu").fit(train)
    assert s.epochs_run_ == 2 and np.isfinite(s.score(train)[0]).all()
    assert train_spans(9, 8, 2) == [(0, 9)] and train_spans(9, 8, 1) == [(0, 8), (8, 9)]
    assert train_spans(10, 8, 2) == [(0, 8), (8, 10)] and train_spans(1, 8, 2) == [(0, 1)]
    # nor a hold-out that leaves one image to fit on
    s = make_scorer("ae_pixels", {**params, "val_frac": 0.5}, device="cpu").fit(train[:2])
    assert s.history_["val"] == [] and s.epochs_run_ == 2
    with pytest.raises(BankError, match="ae_pixels needs at least 2 training images"):
        make_scorer("ae_pixels", device="cpu").fit(train[:1])
    with pytest.raises(ValueError, match=r"the 1x1 grid gives a 1x1 BatchNorm bottleneck, which "
                                         r"needs at least 2 training images, got 1"):
        make_scorer("ae_features", {"max_epochs": 1}, device="cpu").fit(train[:1, :1, :1])
    assert make_scorer("ae_features", {"max_epochs": 1, "batch_norm": False}, device="cpu").fit(
        train[:1, :1, :1]).epochs_run_ == 1


@pytest.mark.parametrize("params, key", [({"kernel": 2}, "kernel"), ({"lr": 0}, "lr"),
                                         ({"val_frac": 1.0}, "val_frac"),
                                         ({"image_score": "mean"}, "image_score"),
                                         ({"reduce": "mean"}, "image_score")])
def test_bad_parameters_name_the_key(params: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key) as err:
        make_scorer("ae_features", params)
    assert "\n" not in str(err.value)


def test_pixels_backbone_bank_shape_and_values(tmp_path: Path) -> None:
    # A 32x32 image of four 16x16 colour quadrants (no resize at 32 px): area pooling by 4
    # gives 8x8 cells of exactly the normalised quadrant colours.
    colours = np.array([[[255, 0, 0], [0, 128, 255]], [[10, 20, 30], [200, 200, 200]]],
                       dtype=np.uint8)
    img = np.kron(colours, np.ones((16, 16, 1), dtype=np.uint8))
    root = tmp_path / "data"
    for sub in ("train/good", "test/good"):
        (root / "widget" / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(img).save(root / "widget" / sub / f"{i:03d}.png")
    spec = ExtractSpec("pixels", image_size=32)
    extract(root, ["widget"], ExtractConfig(spec, num_workers=0, device="cpu"),
            tmp_path / "banks")
    bank = load_bank(tmp_path / "banks", "pixels", spec.tag(), "widget", "train")
    assert list(bank.taps) == [2] and bank.taps[2].shape == (2, 8, 8, 3)
    assert bank.taps[2].dtype == np.float16 and bank.fingerprint["weights"] == "none"
    expected = np.kron((colours / 255.0 - 0.5) / 0.5, np.ones((4, 4, 1)))
    np.testing.assert_allclose(bank.taps[2][0], expected, atol=1e-3)
    # layer 0 is the normalised pixels themselves
    spec0 = ExtractSpec("pixels", image_size=32, layers=(0,))
    extract(root, ["widget"], ExtractConfig(spec0, num_workers=0, device="cpu"),
            tmp_path / "banks")
    full = load_bank(tmp_path / "banks", "pixels", spec0.tag(), "widget", "test").taps[0]
    np.testing.assert_allclose(full[1], (img / 255.0 - 0.5) / 0.5, atol=1e-3)


def test_top_sigma_selects_the_highest_std_channels() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 3, 3, 10))
    train[..., 7] *= 9.0
    train[..., 2] *= 5.0
    train[..., 4] *= 3.0
    train[..., 0] += 100.0  # a large mean is not a large spread
    test = rng.normal(size=(5, 3, 3, 10)) * 4
    pooled_train = train.mean(axis=(1, 2))
    assert top_sigma_channels(pooled_train, 3).tolist() == [2, 4, 7]
    assert top_sigma_channels(pooled_train, 99).tolist() == list(range(10))
    s = make_scorer("knn", {"level": "image", "top_sigma": 2, "k": 4}, device="cpu").fit(
        train.astype(np.float32))
    assert s._channels.tolist() == [2, 7]
    scores, maps = s.score(test.astype(np.float32))
    assert maps is None
    # brute force: mean L2 distance to the 4 nearest train images on channels 2 and 7 only
    zt, zq = pooled_train[:, [2, 7]], test.mean(axis=(1, 2))[:, [2, 7]]
    dist = np.sqrt(((zq[:, None] - zt[None]) ** 2).sum(-1))
    np.testing.assert_allclose(scores, np.sort(dist, axis=1)[:, :4].mean(axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="top_sigma"):
        make_scorer("knn", {"top_sigma": 5})  # patch level


def test_ae_features_uses_every_tap_on_the_finest_grid() -> None:
    # DFR's multi-scale grid: taps at strides 4, 8, 16 aligned onto the finest; the anomaly
    # (rows 2-3, cols 4-5 of the 8x8 tap, the same region in the coarse taps) ranks first
    rng = np.random.default_rng(0)
    shapes = {1: (8, 8, 8), 2: (4, 4, 16), 3: (2, 2, 16)}
    base = {k: rng.normal(size=s) for k, s in shapes.items()}

    def sample(n: int) -> dict[int, np.ndarray]:
        return {k: (b + 0.1 * rng.normal(size=(n, *b.shape))).astype(np.float16)
                for k, b in base.items()}

    train, test = sample(20), sample(8)
    test[1][4:, 2:4, 4:6] += 8.0
    test[2][4:, 1, 2] += 8.0
    test[3][4:, 0, 1] += 8.0
    s = make_scorer("ae_features", {"max_epochs": 20, "lr": 1e-2, "batch_size": 4},
                    device="cpu").fit(train)
    assert s.layers_ == (1, 2, 3) and s._arch_arr[0] == 8 + 16 + 16
    scores, maps = s.score(test)
    assert maps.shape == (8, 8, 8) and scores[4:].min() > scores[:4].max()
    one = make_scorer("ae_features", {"layers": "3", **FAST}, device="cpu").fit(train)
    assert one.layers_ == (3,) and one.score(test)[1].shape == (8, 2, 2)
