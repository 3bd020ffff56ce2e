"""Time patchbank.metrics on the real MVTec bottle masks at full resolution (900x900).

Maps are a blurred, noisy version of each ground-truth mask (fixed seed). Prints seconds,
pixels and peak RSS. ``--copies N`` repeats the image list N times (no extra input memory) to
check scaling towards the largest MVTec AD categories; ``--check`` compares pixel AUROC/AP with
scikit-learn (slow).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from patchbank import metrics
from patchbank.errors import PatchbankError

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec_ad/bottle"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(root: Path, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(masks, maps, labels) for every test image of one category."""
    rng = np.random.default_rng(seed)
    masks, maps, labels = [], [], []
    for image in sorted((root / "test").glob("*/*.png")):
        defect = image.parent.name
        mask_path = root / "ground_truth" / defect / f"{image.stem}_mask.png"
        if defect == "good":
            width, height = Image.open(image).size
            mask = np.zeros((height, width), dtype=bool)
        else:
            mask = np.asarray(Image.open(mask_path)) > 0
        noisy = mask.astype(np.float32) + rng.normal(0, 2.0, mask.shape).astype(np.float32)
        masks.append(mask)
        maps.append(ndimage.gaussian_filter(noisy, sigma=3))
        labels.append(defect != "good")
    if not masks:
        raise PatchbankError(f"{root}/test has no images; pass --root <mvtec category folder>")
    return masks, maps, np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="compare with scikit-learn")
    args = parser.parse_args()

    masks, maps, labels = load(args.root, args.seed)
    masks, maps = masks * args.copies, maps * args.copies
    pixels = sum(m.size for m in maps)
    rss_before = peak_rss_mib()
    print(f"images {len(maps)}  pixels {pixels:,}  defect pixels "
          f"{sum(int(m.sum()) for m in masks):,}  peak RSS before metrics {rss_before:.0f} MiB")

    t = time.perf_counter()
    pixel = metrics.pixel_metrics(masks, maps)
    t_pixel = time.perf_counter() - t
    print(f"pixel_metrics {t_pixel:.2f} s  ({pixels / t_pixel / 1e6:.0f} Mpx/s)  "
          + "  ".join(f"{k} {v:.4f}" for k, v in pixel.items()))
    print(f"peak RSS after pixel metrics {peak_rss_mib():.0f} MiB "
          f"(+{peak_rss_mib() - rss_before:.0f} MiB)")

    scores = np.array([m.max() for m in maps[: len(labels)]])
    t = time.perf_counter()
    image = {"image_auroc": metrics.image_auroc(labels, scores),
             "image_ap": metrics.image_ap(labels, scores),
             "image_f1": metrics.best_f1(labels, scores)[0]}
    t_image = time.perf_counter() - t
    print(f"image metrics {t_image:.3f} s  " + "  ".join(f"{k} {v:.4f}" for k, v in image.items()))
    print(f"total {t_pixel + t_image:.2f} s")

    if args.check:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y = np.concatenate([m.ravel() for m in masks])
        s = np.concatenate([a.ravel() for a in maps])
        t = time.perf_counter()
        auroc, ap = roc_auc_score(y, s), average_precision_score(y, s)
        print(f"scikit-learn {time.perf_counter() - t:.1f} s: pixel_auroc {auroc:.6f} "
              f"(diff {abs(auroc - pixel['pixel_auroc']):.1e})  pixel_ap {ap:.6f} "
              f"(diff {abs(ap - pixel['pixel_ap']):.1e})")


if __name__ == "__main__":
    try:
        main()
    except PatchbankError as err:
        sys.exit(f"error: {err}")
