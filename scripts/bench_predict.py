"""Prediction speed: single-image latency (decode -> score -> heatmap) and batch throughput
against the extract stage (see patchbank.inference.bench)."""

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from patchbank.bench.predict import latency, throughput  # noqa: E402
from patchbank.inference import load_run_model  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--run", type=Path, required=True, help="score-run folder (run.json, model.npz)")
p.add_argument("--data-root", type=Path, default=Path("../shared/data/mvtec_ad"))
p.add_argument("--category", default=None, help="default: the run's category")
p.add_argument("--image", type=Path, default=None,
               help="image for the latency (default: the run's first defective test image)")
p.add_argument("--n-images", type=int, default=64)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--repeats", type=int, default=10)
p.add_argument("--pixel-threshold", default=None, help="also time the mask (e.g. auto)")
p.add_argument("--threshold", default="auto",
               help="image threshold: auto (needs a hold-out), f1 or a number")
p.add_argument("--device", default="auto")
p.add_argument("--skip-throughput", action="store_true")
args = p.parse_args()
logging.basicConfig(level=logging.WARNING)
model = load_run_model(args.run, device=args.device)
image = args.image
if image is None:
    import pandas as pd

    scores = pd.read_csv(args.run / "image_scores.csv")
    image = Path(scores[scores["label"] == 1]["path"].iloc[0])
report = {"run": model.describe(), "image": str(image),
          "latency": latency(model, image, repeats=args.repeats,
                             pixel_threshold=args.pixel_threshold,
                             threshold=args.threshold)}
if not args.skip_throughput:
    report["throughput"] = throughput(model, args.data_root, args.category or model.category,
                                      args.n_images, args.batch_size,
                                      repeats=max(1, args.repeats // 3),
                                      threshold=args.threshold)
print(json.dumps(report, indent=1))
