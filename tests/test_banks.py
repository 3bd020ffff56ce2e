"""Bank format: written and read back, atomic under kills, fingerprints enforced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.core.errors import BankError
from patchbank.store.banks import (
    META_COLUMNS,
    BankPaths,
    BankWriter,
    bank_status,
    load_bank,
    load_pair,
)

FP = {"backbone": "toy", "weights": "random:seed0", "layers": [2, 3], "image_size": 64,
      "crop": None, "grid": [4, 4], "channels": 8, "dtype": "float16"}


def meta(n: int, split: str) -> pd.DataFrame:
    return pd.DataFrame(
        [[f"/x/{split}/{i:03d}.png", "cat", split, "good" if i % 2 == 0 else "hole", i % 2,
          "" if i % 2 == 0 else f"/x/gt/{i:03d}_mask.png", 900, 800] for i in range(n)],
        columns=META_COLUMNS,
    )


def write(root: Path, split: str, feats: np.ndarray, **extra) -> BankPaths:
    paths = BankPaths.of(root, "toy", "cat", split)
    fp = {**FP, "split": split, "files_hash": "h" + split, "n_images": len(feats), **extra}
    with BankWriter(paths, len(feats), feats.shape[1:3], feats.shape[3]) as w:
        w.write(np.arange(len(feats)), feats)
        w.commit(meta(len(feats), split), fp)
    return paths


def test_write_and_read_back(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=(5, 4, 4, 8)).astype(np.float32)
    write(tmp_path, "train", feats)
    bank = load_bank(tmp_path, "toy", "cat", "train", expect={"backbone": "toy"})
    assert bank.features.dtype == np.float16 and bank.features.shape == (5, 4, 4, 8)
    np.testing.assert_allclose(bank.features, feats.astype(np.float16))
    assert list(bank.meta.columns) == META_COLUMNS
    assert bank.meta["mask_path"].iloc[0] == "" and bank.meta["label"].tolist() == [0, 1, 0, 1, 0]
    assert bank.fingerprint["n_images"] == 5 and bank.grid == (4, 4)
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "toy" / "cat").iterdir()) == [
        "train.csv", "train.json", "train.npz"]


def test_batches_written_out_of_order(tmp_path: Path) -> None:
    feats = np.arange(6 * 2 * 2 * 3, dtype=np.float32).reshape(6, 2, 2, 3)
    paths = BankPaths.of(tmp_path, "toy", "cat", "test")
    with BankWriter(paths, 6, (2, 2), 3) as w:
        w.write(np.array([3, 4, 5]), feats[3:])
        w.write(np.array([0, 1, 2]), feats[:3])
        w.commit(meta(6, "test"), {**FP, "split": "test"})
    np.testing.assert_array_equal(load_bank(tmp_path, "toy", "cat", "test").features, feats)


def test_incomplete_writer_refuses_commit_and_keeps_old_bank(tmp_path: Path) -> None:
    old = write(tmp_path, "train", np.ones((3, 4, 4, 8), np.float32))
    before = old.npz.read_bytes()
    with pytest.raises(BankError, match="never written"):
        with BankWriter(old, 3, (4, 4), 8) as w:
            w.write(np.array([0]), np.zeros((1, 4, 4, 8)))
            w.commit(meta(3, "train"), {**FP, "split": "train"})
    assert old.npz.read_bytes() == before and bank_status(old, json.loads(old.json.read_text())) \
        == "complete"
    assert not list(old.npz.parent.glob(".*"))


def test_killed_run_leaves_no_half_written_bank(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing: the previous bank stays complete and unchanged."""
    old = write(tmp_path, "train", np.ones((3, 4, 4, 8), np.float32))
    fp_old = json.loads(old.json.read_text())
    before = old.npz.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from patchbank.store.banks import BankPaths, BankWriter
        paths = BankPaths.of({str(tmp_path)!r}, "toy", "cat", "train")
        w = BankWriter(paths, 3, (4, 4), 8)
        w.write(np.array([0]), np.zeros((1, 4, 4, 8)))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert old.npz.read_bytes() == before
    assert bank_status(old, fp_old) == "complete"
    # the next writer cleans the killed run's temporary file
    killed = list(old.npz.parent.glob(".train.*.npz"))
    assert len(killed) == 1
    live = old.npz.with_name(f".train.{os.getppid()}.npz")  # a writer that is still running
    live.write_bytes(b"")
    write(tmp_path, "train", np.zeros((3, 4, 4, 8), np.float32))
    assert not killed[0].exists() and live.exists()


def test_missing_and_incomplete_banks(tmp_path: Path) -> None:
    with pytest.raises(BankError, match=r"train\.npz: no complete train bank.*extract\.py"):
        load_bank(tmp_path, "toy", "cat", "train")
    paths = write(tmp_path, "train", np.ones((2, 4, 4, 8), np.float32))
    os.remove(paths.json)  # as if killed between renames
    assert bank_status(paths, FP) == "missing"
    with pytest.raises(BankError, match="no complete"):
        load_bank(tmp_path, "toy", "cat", "train")


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "train", np.ones((2, 4, 4, 8), np.float32))
    fp = json.loads(paths.json.read_text())
    assert bank_status(paths, fp) == "complete"
    assert bank_status(paths, {**fp, "image_size": 128}) == "stale"
    with pytest.raises(BankError, match=r"image_size: 64 != 128"):
        load_bank(tmp_path, "toy", "cat", "train", expect={"image_size": 128})


def test_pair_from_different_configurations_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "train", np.ones((2, 4, 4, 8), np.float32))
    write(tmp_path, "test", np.ones((2, 4, 4, 8), np.float32), weights="hub:other")
    with pytest.raises(BankError, match=r"test\.json: test bank was built differently.*weights"):
        load_pair(tmp_path, "toy", "cat")
    write(tmp_path, "test", np.ones((3, 4, 4, 8), np.float32))
    train, test = load_pair(tmp_path, "toy", "cat")
    assert len(train.features) == 2 and len(test.features) == 3


def test_csv_not_matching_npz_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "train", np.ones((3, 4, 4, 8), np.float32))
    meta(2, "train").to_csv(paths.csv, index=False)
    with pytest.raises(BankError, match="2 rows vs 3 grids"):
        load_bank(tmp_path, "toy", "cat", "train")
