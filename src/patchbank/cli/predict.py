"""``patchbank predict``: score new images with a fitted run - parsing, then the package."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from patchbank.cli.args import add_banks_dir, add_device, add_run_choice, add_scores_dir
from patchbank.cli.runtime import add_verbose, new_parser, run_command
from patchbank.core.errors import PatchbankError

log = logging.getLogger("patchbank")

COLUMNS = ["path", "score", "decision", "threshold", "threshold_kind", "seconds"]
PIXEL_COLUMNS = ["pixel_threshold", "pixel_threshold_kind", "defect_fraction"]


def overlay_names(paths: Sequence[str]) -> list[str]:
    """One PNG name per image: its stem, made unique with ``-2``, ``-3``... on collisions."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


@contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed onto it on success, removed on failure."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = new_parser(
        prog, "Score new images with a fitted run (one CSV row per image, optional overlays).",
        "patchbank predict --backbone efficientnet_lite0 --method patchcore --category "
        "demo_object --images data/demo/demo_object/test/hole --heatmaps overlays",
        epilog="Batch throughput on a CPU: score PatchCore runs with --param search=ivf (exact "
               "image scores, approximate maps) and set OMP_NUM_THREADS=1 for light backbones; "
               "see the README's predictions section.")
    p.add_argument("--backbone", default=None,
                   help="backbone of the run (not needed when --run is a folder path)")
    add_run_choice(p)
    p.add_argument("--category", default=None,
                   help="category of the run (default: the run's only category)")
    add_scores_dir(p)
    p.add_argument("--images", required=True, help="an image, a folder, or a quoted glob")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"),
                   help="CSV with one row per image")
    p.add_argument("--heatmaps", type=Path, default=None,
                   help="folder for one overlay PNG per image (heatmap + defect-mask outline; "
                        "default: none)")
    p.add_argument("--threshold", default="auto",
                   help="auto (mean + 3 sigma of held-out train scores), f1 (oracle, from the "
                        "evaluation), or a number")
    p.add_argument("--pixel-threshold", default=None,
                   help="defect-mask threshold on the heatmap: auto (held-out train maps), "
                        "oracle (best Dice on the test set), none, or a number "
                        "(default: auto, or no mask when auto is not possible)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in overlays")
    p.add_argument("--weights", default=None,
                   help="weights file, needed when the banks were extracted from a local file")
    add_banks_dir(p, None, "where the run's banks are (for --pixel-threshold auto on older "
                           "runs; default: featurebanks/ beside the scores folder)")
    add_device(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    p.add_argument("--skip-bad", action="store_true",
                   help="give unreadable images an error row instead of stopping")
    add_verbose(p)
    return p


def run_folder(args: argparse.Namespace) -> Path:
    """The run folder ``--run``/``--method`` select (``--run`` may also be a folder path)."""
    from patchbank.store.catalog import find_one_run

    if args.run and ("/" in args.run or Path(args.run).is_dir()):
        return Path(args.run)  # a folder path: load_run_model says what is wrong with it
    if not args.backbone:
        raise PatchbankError(f"--{'run' if args.run else 'method'}: also pass --backbone "
                             "(or --run scores/<backbone>/<run>/<category>)")
    wanted = [args.category] if args.category else None
    ref = find_one_run(args.scores_dir, args.backbone, method=args.method, run=args.run,
                       categories=wanted)
    if args.category is None and len(ref.categories) > 1:
        raise PatchbankError(f"{args.scores_dir}/{args.backbone}/{ref.name}: holds "
                             f"{', '.join(ref.categories)}; pick one with --category")
    return Path(args.scores_dir, args.backbone, ref.name, args.category or ref.categories[0])


def _pixel_choice(args: argparse.Namespace, model: Any, maps: bool) -> str | float | None:
    """The pixel threshold to use: the parsed flag, or "none" when auto is not possible."""
    from patchbank.inference import parse_threshold

    explicit = args.pixel_threshold is not None
    pixel = parse_threshold(args.pixel_threshold if explicit else "auto",
                            "--pixel-threshold", ("auto", "oracle", "dice", "none"))
    if maps and pixel != "none":
        try:
            print(f"pixel threshold: {model.pixel_threshold(pixel)}", file=sys.stderr)
        except PatchbankError as err:
            if explicit:
                raise
            log.warning("%s; overlays without a defect mask", err)
            pixel = "none"
    return pixel


def _write(args: argparse.Namespace, model: Any, images: list, threshold: Any, maps: bool,
           pixel: Any) -> tuple[int, int, int]:
    """Stream predictions into the CSV (and overlays); returns (images, anomalous, bad)."""
    from PIL import Image

    from patchbank.inference import iter_predict, prediction_overlay

    names = overlay_names([str(x) for x in images])
    if maps:
        args.heatmaps.mkdir(parents=True, exist_ok=True)
    columns = COLUMNS + (PIXEL_COLUMNS if maps and pixel != "none" else []) + \
        (["error"] if args.skip_bad else [])
    n = anomalous = bad = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(args.out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for pred in iter_predict(
                model, images, threshold=threshold, maps=maps,
                pixel_threshold=None if pixel == "none" else pixel, keep_images=maps,
                batch_size=args.batch_size, num_workers=args.workers,
                on_error="skip" if args.skip_bad else "raise"):
            writer.writerow(pred.row())
            n += 1
            anomalous += pred.anomalous
            bad += pred.error is not None
            if pred.error is not None:
                log.warning("%s", pred.error)
            elif maps:
                picture = prediction_overlay(model, pred, alpha=args.alpha)
                with _replacing(args.heatmaps / names[pred.index]) as tmp_png:
                    Image.fromarray(picture).save(tmp_png, format="PNG", compress_level=1)
    return n, anomalous, bad


def predict_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    p = _parser(prog)

    def run(args: argparse.Namespace) -> None:
        from patchbank.inference import list_images, load_run_model, parse_threshold

        threshold = parse_threshold(args.threshold)
        if args.batch_size < 1:
            raise PatchbankError(f"--batch-size {args.batch_size}: must be at least 1")
        folder = run_folder(args)
        images = list_images(args.images)
        model = load_run_model(folder, weights=args.weights, device=args.device,
                               banks_dir=args.banks_dir)
        print(model.describe(), file=sys.stderr)
        print(f"image threshold: {model.image_threshold(threshold)}", file=sys.stderr)
        maps = args.heatmaps is not None
        if maps and not model.pixel_level:
            log.warning("%s is an image-level method: no anomaly maps, no heatmaps written",
                        model.method)
            maps = False
        pixel = _pixel_choice(args, model, maps)
        n, anomalous, bad = _write(args, model, images, threshold, maps, pixel)
        print(f"{n} images: {anomalous} anomalous, {n - anomalous - bad} good"
              + (f", {bad} unreadable" if bad else "") + f" -> {args.out}"
              + (f", overlays in {args.heatmaps}" if maps else ""))

    run_command(p, run, argv)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TQDM_DISABLE", "1")
    predict_main()
