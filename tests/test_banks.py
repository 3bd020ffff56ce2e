"""Bank format 2: taps written and read back at their own resolutions, atomic under kills,
missing/stale/broken detection, fingerprints enforced against the folder and the files."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.core.atomic import hostname
from patchbank.core.errors import BankError
from patchbank.store.banks import (
    META_COLUMNS,
    BankPaths,
    BankWriter,
    bank_status,
    find_tags,
    load_bank,
    load_pair,
)

TAG = "s64-l1.2-toy-00000000"
LAYERS = (1, 2)
#: layer 1 at stride 4 and layer 2 at stride 8 of a 16 px toy input: different grids, channels.
SHAPES = ((4, 4, 8), (2, 2, 16))


def fingerprint(split: str, n: int, *, category: str = "cat", tag: str = TAG,
                shapes=SHAPES, **extra) -> dict:
    return {"format": 2, "backbone": "toy", "model_id": "toy", "weights": "random:seed0",
            "tag": tag, "layers": list(LAYERS), "image_size": 64, "crop": None,
            "taps": [{"layer": layer, "shape": list(s)}
                     for layer, s in zip(LAYERS, shapes, strict=True)],
            "dtype": "float16", "category": category, "split": split,
            "files_hash": "h" + split, "n_images": n, **extra}


def meta(n: int, split: str) -> pd.DataFrame:
    return pd.DataFrame(
        [[f"/x/{split}/{i:03d}.png", "cat", split, "good" if i % 2 == 0 else "hole", i % 2,
          "" if i % 2 == 0 else f"/x/gt/{i:03d}_mask.png", 900, 800] for i in range(n)],
        columns=META_COLUMNS,
    )


def make_taps(n: int, seed: int = 0, fill: float | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if fill is not None:
        return [np.full((n, *s), fill, np.float32) for s in SHAPES]
    return [rng.normal(size=(n, *s)).astype(np.float32) for s in SHAPES]


def write(root: Path, split: str, taps: list[np.ndarray], *, category: str = "cat",
          tag: str = TAG, **extra) -> BankPaths:
    paths = BankPaths.of(root, "toy", tag, category, split)
    n = len(taps[0])
    with BankWriter(paths, n, LAYERS, SHAPES) as w:
        w.write(np.arange(n), taps)
        w.commit(meta(n, split), fingerprint(split, n, category=category, tag=tag, **extra))
    return paths


def snapshot(paths: BankPaths) -> dict[str, bytes]:
    """Every file of a bank folder (temporaries excluded), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(paths.folder.iterdir())
            if not p.name.startswith(".")}


def test_write_and_read_back_every_tap_at_its_own_resolution(tmp_path: Path) -> None:
    taps = make_taps(5)
    paths = write(tmp_path, "train", taps)
    assert paths.folder == tmp_path / "toy" / TAG / "cat"
    bank = load_bank(tmp_path, "toy", TAG, "cat", "train", expect={"backbone": "toy"})
    assert bank.layers == LAYERS and list(bank.taps) == [1, 2]
    for layer, want, shape in zip(LAYERS, taps, SHAPES, strict=True):
        got = bank.taps[layer]
        assert isinstance(got, np.memmap)  # memory-mapped, not loaded
        assert got.dtype == np.float16 and got.shape == (5, *shape)
        np.testing.assert_array_equal(got, want.astype(np.float16))
    assert list(bank.meta.columns) == META_COLUMNS and len(bank) == 5
    assert bank.meta["mask_path"].iloc[0] == "" and bank.meta["label"].tolist() == [0, 1, 0, 1, 0]
    assert bank.fingerprint["n_images"] == 5 and bank.fingerprint["tag"] == TAG
    assert bank.grid == (4, 4)  # the finest tap's grid
    # plain .npy files, one per tap, and no temporary files left behind
    assert sorted(p.name for p in paths.folder.iterdir()) == [
        "train.csv", "train.json", "train.layer1.npy", "train.layer2.npy"]
    np.testing.assert_array_equal(np.load(paths.tap(2)), taps[1].astype(np.float16))
    assert bank_status(paths, fingerprint("train", 5)) == ("complete", [])


def test_bank_paths_reject_unknown_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        BankPaths.of(tmp_path, "toy", TAG, "cat", "val")


def test_batches_written_out_of_order(tmp_path: Path) -> None:
    taps = [np.arange(6 * np.prod(s), dtype=np.float32).reshape(6, *s) for s in SHAPES]
    paths = BankPaths.of(tmp_path, "toy", TAG, "cat", "test")
    with BankWriter(paths, 6, LAYERS, SHAPES) as w:
        w.write(np.array([4, 5]), [t[4:] for t in taps])
        w.write(np.array([2, 3]), [t[2:4] for t in taps])
        w.write(np.array([0, 1]), [t[:2] for t in taps])
        w.commit(meta(6, "test"), fingerprint("test", 6))
    bank = load_bank(tmp_path, "toy", TAG, "cat", "test")
    for layer, want in zip(LAYERS, taps, strict=True):
        np.testing.assert_array_equal(bank.taps[layer], want.astype(np.float16))


def test_writer_rejects_batches_that_do_not_fit(tmp_path: Path) -> None:
    paths = BankPaths.of(tmp_path, "toy", TAG, "cat", "train")
    taps = make_taps(3)
    with BankWriter(paths, 3, LAYERS, SHAPES) as w:
        with pytest.raises(ValueError, match="expected taps"):
            w.write(np.arange(3), [taps[0], taps[0]])  # second tap at the wrong resolution
        with pytest.raises(ValueError, match="expected taps"):
            w.write(np.arange(3), taps[:1])  # a tap missing
        with pytest.raises(ValueError, match="consecutive rows"):
            w.write(np.array([0, 2, 1]), taps)
    assert not list(paths.folder.iterdir())  # nothing published, temporaries removed


def test_incomplete_writer_refuses_commit_and_keeps_old_bank(tmp_path: Path) -> None:
    old = write(tmp_path, "train", make_taps(3, fill=1.0))
    before = snapshot(old)
    with pytest.raises(BankError, match="2 images were never written"):
        with BankWriter(old, 3, LAYERS, SHAPES) as w:
            w.write(np.array([0]), [t[:1] for t in make_taps(3, fill=0.0)])
            w.commit(meta(3, "train"), fingerprint("train", 3))
    assert snapshot(old) == before
    assert bank_status(old, json.loads(old.json.read_text())) == ("complete", [])
    assert not list(old.folder.glob(".*"))  # the writer's temporaries are gone


KILL_SCRIPT = """
    import os, signal, numpy as np
    from patchbank.store.banks import BankPaths, BankWriter
    paths = BankPaths.of({root!r}, "toy", {tag!r}, "cat", "train")
    w = BankWriter(paths, 3, {layers!r}, {shapes!r})
    w.write(np.array([0]), [np.zeros((1, *s)) for s in {shapes!r}])
    {flush}
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_killed_writer(root: Path, flush: str = "") -> None:
    script = textwrap.dedent(KILL_SCRIPT).format(root=str(root), tag=TAG, layers=LAYERS,
                                                 shapes=SHAPES, flush=flush)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL


def test_killed_run_leaves_no_half_written_bank(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing: the previous bank stays complete and unchanged."""
    old = write(tmp_path, "train", make_taps(3, fill=1.0))
    fp_old = json.loads(old.json.read_text())
    before = snapshot(old)
    run_killed_writer(tmp_path, flush="[f.flush() for f in w._files]")
    assert snapshot(old) == before
    assert bank_status(old, fp_old) == ("complete", [])
    bank = load_bank(tmp_path, "toy", TAG, "cat", "train")
    assert all((t == 1).all() for t in bank.taps.values())
    # the killed writer's half-written taps lie only under temporary names
    leftovers = sorted(p.name for p in old.folder.glob(".*"))
    assert len(leftovers) == 2, leftovers
    assert all(name.startswith((".train.layer1.npy.", ".train.layer2.npy.")) and
               name.endswith(".tmp") for name in leftovers)
    assert find_tags(tmp_path, "toy", "cat") == []  # only test.json marks a configuration
    # the next writer replaces the bank completely
    new = write(tmp_path, "train", make_taps(3, fill=2.0))
    assert bank_status(new, fp_old) == ("complete", [])
    bank = load_bank(tmp_path, "toy", TAG, "cat", "train")
    assert all((t == 2).all() for t in bank.taps.values())


def test_killed_with_no_bank_before_leaves_a_missing_bank(tmp_path: Path) -> None:
    run_killed_writer(tmp_path)
    paths = BankPaths.of(tmp_path, "toy", TAG, "cat", "train")
    assert bank_status(paths, fingerprint("train", 3)) == ("missing", [])
    assert not any(paths.tap(layer).exists() for layer in LAYERS)
    with pytest.raises(BankError, match=r"train\.json: train bank missing.*extract\.py"):
        load_bank(tmp_path, "toy", TAG, "cat", "train")


def test_next_writer_sweeps_a_killed_runs_temporaries(tmp_path: Path) -> None:
    run_killed_writer(tmp_path)
    paths = BankPaths.of(tmp_path, "toy", TAG, "cat", "train")
    killed = list(paths.folder.glob(".*.tmp"))
    assert len(killed) == 2
    live = paths.tap(1).with_name(  # a writer on this host that is still running: kept
        f".{paths.tap(1).name}.{hostname()}.{os.getppid()}.0123abcd.tmp")
    live.write_bytes(b"")
    write(tmp_path, "train", make_taps(3))
    assert not any(p.exists() for p in killed) and live.exists()


def test_missing_bank_and_one_killed_between_renames(tmp_path: Path) -> None:
    with pytest.raises(BankError, match=r"train\.json: train bank missing.*extract\.py"):
        load_bank(tmp_path, "toy", TAG, "cat", "train")
    paths = write(tmp_path, "train", make_taps(2))
    os.remove(paths.json)  # commit removes the old fingerprint first: killed right after
    assert bank_status(paths, fingerprint("train", 2)) == ("missing", [])
    with pytest.raises(BankError, match="train bank missing"):
        load_bank(tmp_path, "toy", TAG, "cat", "train")


def _truncate_tap(paths: BankPaths) -> None:
    data = paths.tap(2).read_bytes()
    paths.tap(2).write_bytes(data[: len(data) - 7])


def _delete_tap(paths: BankPaths) -> None:
    paths.tap(1).unlink()


def _float32_tap(paths: BankPaths) -> None:
    np.save(paths.tap(1), np.zeros((3, *SHAPES[0]), np.float32))


def _short_csv(paths: BankPaths) -> None:
    meta(2, "train").to_csv(paths.csv, index=False)


def _missing_csv(paths: BankPaths) -> None:
    paths.csv.unlink()


def _garbled_json(paths: BankPaths) -> None:
    paths.json.write_text('{"format": 2, "backbone": ')


@pytest.mark.parametrize("damage, reason, refusal", [
    (_truncate_tap, r"train\.layer2\.npy", "unreadable bank"),
    (_delete_tap, r"train\.layer1\.npy", "unreadable bank"),
    (_float32_tap, r"train\.layer1\.npy holds float32", "fingerprint says float16"),
    (_short_csv, "train.csv has 2 rows for 3 images", r"\(2 rows for 3 images\)"),
    (_missing_csv, r"train\.csv", "unreadable bank"),
    (_garbled_json, "fingerprint unreadable", "train bank unreadable"),
])
def test_damaged_bank_is_broken_and_refused(tmp_path: Path, damage, reason: str,
                                            refusal: str) -> None:
    paths = write(tmp_path, "train", make_taps(3))
    damage(paths)
    status, reasons = bank_status(paths, fingerprint("train", 3))
    assert status == "broken", reasons
    assert any(re.search(reason, r) for r in reasons), reasons
    with pytest.raises(BankError, match=refusal) as err:
        load_bank(tmp_path, "toy", TAG, "cat", "train")
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)


def test_shapes_that_differ_from_the_fingerprint_are_refused(tmp_path: Path) -> None:
    """Files written with one set of shapes, a fingerprint stating others: never read."""
    paths = BankPaths.of(tmp_path, "toy", TAG, "cat", "train")
    lying = fingerprint("train", 3, shapes=((4, 4, 8), (4, 4, 16)))
    with BankWriter(paths, 3, LAYERS, SHAPES) as w:
        w.write(np.arange(3), make_taps(3))
        w.commit(meta(3, "train"), lying)
    status, reasons = bank_status(paths, lying)
    assert status == "broken"
    assert reasons == ["train.layer2.npy: train.layer2.npy holds float16 (3, 2, 2, 16), the "
                       "fingerprint says float16 (3, 4, 4, 16)"]
    with pytest.raises(BankError, match=r"\(3, 2, 2, 16\), the fingerprint says float16 "
                                        r"\(3, 4, 4, 16\)"):
        load_bank(tmp_path, "toy", TAG, "cat", "train")
    # a different number of images than the fingerprint states is refused the same way
    paths = write(tmp_path, "test", make_taps(3))
    fp = json.loads(paths.json.read_text())
    paths.json.write_text(json.dumps({**fp, "n_images": 4}))
    assert bank_status(paths, {**fp, "n_images": 4})[0] == "broken"
    with pytest.raises(BankError, match=r"\(3, 4, 4, 8\), the fingerprint says float16 "
                                        r"\(4, 4, 4, 8\)"):
        load_bank(tmp_path, "toy", TAG, "cat", "test")


def test_fingerprint_mismatch_is_stale_and_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "train", make_taps(2))
    fp = json.loads(paths.json.read_text())
    assert bank_status(paths, fp) == ("complete", [])
    assert bank_status(paths, {**fp, "image_size": 128}) == ("stale", ["image_size: 64 != 128"])
    status, reasons = bank_status(paths, {**fp, "taps": fp["taps"][:1]})
    assert status == "stale" and reasons[0].startswith("taps: ")
    with pytest.raises(BankError, match=r"another configuration \(image_size: 64 != 128\)"):
        load_bank(tmp_path, "toy", TAG, "cat", "train", expect={"image_size": 128})


@pytest.mark.parametrize("edit, reason", [
    ({"format": 1}, "bank format 1, this patchbank reads 2"),
    ({"tag": None}, "key 'tag' missing"),
    ({"n_images": True}, "key 'n_images' missing or not"),
    ({"split": "test"}, "split 'test' in a train file"),
    ({"taps": [{"layer": 1, "shape": [4, 4]}]}, "taps must be a list of"),
])
def test_malformed_fingerprint_is_stale_and_refused(tmp_path: Path, edit: dict,
                                                    reason: str) -> None:
    paths = write(tmp_path, "train", make_taps(2))
    fp = json.loads(paths.json.read_text())
    paths.json.write_text(json.dumps({**fp, **edit}))
    status, reasons = bank_status(paths, fp)
    assert status == "stale" and any(reason in r for r in reasons), reasons
    with pytest.raises(BankError, match="--overwrite"):
        load_bank(tmp_path, "toy", TAG, "cat", "train")


@pytest.mark.parametrize("backbone, tag, category, wrong", [
    ("other_net", TAG, "cat", "backbone: 'toy' != 'other_net'"),
    ("toy", TAG, "dog", "category: 'cat' != 'dog'"),
    ("toy", "s64-l1.2-toy-11111111", "cat", "tag: 's64-l1.2-toy-00000000' != "
                                            "'s64-l1.2-toy-11111111'"),
])
def test_bank_copied_into_another_folder_is_refused(tmp_path: Path, backbone: str, tag: str,
                                                    category: str, wrong: str) -> None:
    paths = write(tmp_path, "train", make_taps(2))
    shutil.copytree(paths.folder, tmp_path / backbone / tag / category, dirs_exist_ok=True)
    with pytest.raises(BankError, match="does not belong in this folder") as err:
        load_bank(tmp_path, backbone, tag, category, "train")
    assert wrong in str(err.value)
    load_bank(tmp_path, "toy", TAG, "cat", "train")  # the original still loads


def test_pair_from_different_configurations_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "train", make_taps(2))
    write(tmp_path, "test", make_taps(2), weights="hub:other")
    with pytest.raises(BankError, match=r"test\.json: test bank was built differently.*weights"):
        load_pair(tmp_path, "toy", TAG, "cat")
    write(tmp_path, "test", make_taps(3))  # per-split keys (n_images, files_hash) may differ
    train, test = load_pair(tmp_path, "toy", TAG, "cat")
    assert len(train) == 2 and len(test) == 3
    assert train.taps[2].shape == (2, 2, 2, 16) and test.taps[1].shape == (3, 4, 4, 8)


def test_find_tags_lists_configurations_and_ignores_format_1(tmp_path: Path, caplog) -> None:
    assert find_tags(tmp_path, "toy", "cat") == []
    other = "s64-l1.2-toy-11111111"
    for tag in (other, TAG):
        for split in ("train", "test"):
            write(tmp_path, split, make_taps(2), tag=tag)
    write(tmp_path, "train", make_taps(2), tag="s64-l1.2-toy-22222222")  # no test bank yet
    # a format-1 bank (one upsampled npz in <backbone>/<category>/) from an older patchbank
    old = tmp_path / "toy" / "cat"
    old.mkdir()
    (old / "test.json").write_text(json.dumps({"format": 1, "backbone": "toy"}))
    (old / "test.npz").write_bytes(b"PK")
    with caplog.at_level(logging.WARNING):
        assert find_tags(tmp_path, "toy", "cat") == [TAG, other]
    assert "format 1" in caplog.text and "ignored" in caplog.text
