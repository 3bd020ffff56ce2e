"""Shared fixtures: toy banks written through the real bank writer, the real-data location."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.store.banks import META_COLUMNS, BankPaths, BankWriter

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


@pytest.fixture
def real_root() -> Path:
    """The shared MVTec AD folder, or skip (with the reason) when it is absent."""
    if not (REAL_ROOT / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real MVTec AD bottle not found at {REAL_ROOT}")
    return REAL_ROOT


def bottle_subset(real_root: Path, dest: Path, n_train: int = 16,
                  defects: tuple[str, ...] = ("broken_large",), n_test: int = 3) -> Path:
    """A small MVTec-layout bottle made of symlinks to the shared data (nothing copied)."""
    src, out = real_root / "bottle", dest / "bottle"
    pick = {"train/good": sorted((src / "train/good").glob("*.png"))[:n_train],
            "test/good": sorted((src / "test/good").glob("*.png"))[:n_test]}
    for d in defects:
        pick[f"test/{d}"] = sorted((src / "test" / d).glob("*.png"))[:n_test]
        pick[f"ground_truth/{d}"] = [src / "ground_truth" / d / f"{p.stem}_mask.png"
                                     for p in pick[f"test/{d}"]]
    for rel, files in pick.items():
        (out / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / rel / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU tensors: one intra-op thread avoids OpenMP spin contention on a busy 2-core box
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOY_TAG = "s32-l2.3-toy-00000000"


def toy_fingerprint(split: str, n: int, shapes=((6, 6, 16),), **extra) -> dict:
    """A format-2 fingerprint for toy banks of backbone "toy", category "widget"."""
    layers = list(range(len(shapes)))
    return {"format": 2, "backbone": "toy", "model_id": "toy", "weights": "random:seed0",
            "tag": TOY_TAG, "layers": layers, "image_size": 32, "crop": None,
            "taps": [{"layer": i, "shape": list(s)} for i, s in enumerate(shapes)],
            "dtype": "float16", "category": "widget", "split": split, "files_hash": split,
            "n_images": n, **extra}


def write_toy_banks(banks_dir: Path, n_train: int = 30, n_good: int = 6, n_bad: int = 6,
                    seed: int = 0, size: int = 48, **extra) -> dict:
    """Toy banks: smooth normal features; defective test images get a shifted 2x2 patch block.

    Returns the positions of the anomalous blocks (test index -> (row, col)) and sizes so
    tests can build matching masks of ``size`` x ``size`` pixels.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(6, 6, 16))

    def sample(n: int) -> np.ndarray:
        return (base + 0.3 * rng.normal(size=(n, 6, 6, 16))).astype(np.float32)

    blocks = {}
    test = sample(n_good + n_bad)
    for i in range(n_good, n_good + n_bad):
        r, c = rng.integers(0, 5, size=2)
        test[i, r:r + 2, c:c + 2] += 3.0
        blocks[i] = (int(r), int(c))
    for split, feats in (("train", sample(n_train)), ("test", test)):
        rows = []
        for i in range(len(feats)):
            bad = split == "test" and i in blocks
            rows.append([f"/nowhere/widget/{split}/{i:03d}.png", "widget", split,
                         "blob" if bad else "good", int(bad),
                         f"/nowhere/widget/ground_truth/blob/{i:03d}_mask.png" if bad else "",
                         size, size])
        paths = BankPaths.of(banks_dir, "toy", TOY_TAG, "widget", split)
        with BankWriter(paths, len(feats), [0], [(6, 6, 16)]) as w:
            w.write(np.arange(len(feats)), [feats])
            w.commit(pd.DataFrame(rows, columns=META_COLUMNS),
                     toy_fingerprint(split, len(feats), **extra))
    return blocks
