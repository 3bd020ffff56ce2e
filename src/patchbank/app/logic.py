"""The app's logic as plain functions (the Streamlit page only lays them out).

Uploads are checked before anything decodes them: size in bytes, the real format from the
file's header (not its name), the pixel count against :data:`MAX_PIXELS` (decompression bombs),
then a full decode with :func:`patchbank.data.mvtec.load_image` — the decoder the pipeline
uses — so truncated or corrupt files are refused with one line, and 16-bit, grayscale,
palette and alpha images are converted exactly as for training (and said so). Zips are read
in memory, never extracted by name: path-traversal entries, junk, non-images, oversized or
suspiciously compressed members are skipped with a note, and too many members or too many
bytes refuse the whole archive. The only files the app writes are each upload's bytes in a
private temporary folder, removed as soon as the image is decoded.
"""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from patchbank.core.errors import PatchbankError
from patchbank.data.mvtec import load_image
from patchbank.inference import (
    Prediction,
    RunModel,
    Threshold,
    find_runs,
    iter_predict,
    load_run_model,
    overlay,
    predict,
)
from patchbank.store.records import RunInfo

#: largest accepted upload (one image or one zip), bytes
MAX_UPLOAD_BYTES = 64 << 20
#: largest accepted image, pixels (checked from the header, before decoding)
MAX_PIXELS = 40_000_000
#: most images taken from one zip
MAX_ZIP_IMAGES = 200
#: largest zip member, bytes uncompressed; and all members together
MAX_MEMBER_BYTES = 32 << 20
MAX_ZIP_TOTAL_BYTES = 512 << 20
#: members compressed more than this (uncompressed / compressed) are treated as bombs
MAX_COMPRESSION_RATIO = 200
#: image formats accepted (PIL format names) and upload extensions offered
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "BMP": "BMP", "TIFF": "TIFF", "MPO": "JPEG"}
IMAGE_TYPES = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"]
JUNK_PREFIXES = ("__MACOSX/", ".")
#: longest side of gallery thumbnails
THUMB_SIDE = 320


# --------------------------------------------------------------------------- runs


def run_table(scores_dir: Path | str) -> pd.DataFrame:
    """Fitted runs under ``scores_dir`` with their main metrics (one row per run folder)."""
    rows = []
    for r in find_runs(scores_dir):
        m = r["metrics"] or {}
        rows.append({
            "backbone": r["backbone"], "run": r["run"], "category": r["category"],
            "method": r["method"], "pixel_level": r["pixel_level"],
            "image_auroc": m.get("image_auroc"), "pixel_auroc": m.get("pixel_auroc"),
            "pro": m.get("pro"), "folder": str(r["folder"]),
        })
    return pd.DataFrame(rows, columns=["backbone", "run", "category", "method", "pixel_level",
                                       "image_auroc", "pixel_auroc", "pro", "folder"])


def metrics_summary(model: RunModel) -> dict[str, Any]:
    """What the page shows about a run: method, weights and the evaluate stage's metrics."""
    m = model.metrics or {}

    def pct(key: str) -> str:
        v = m.get(key)
        return f"{100 * v:.1f}" if isinstance(v, int | float) and math.isfinite(v) else "–"

    return {
        "method": model.method, "backbone": model.backbone, "category": model.category,
        "weights": short_weights(model.extractor_info.weights_id),
        "input": model.preprocess.image_size,
        "image AUROC": pct("image_auroc"), "pixel AUROC": pct("pixel_auroc"), "PRO": pct("pro"),
        "evaluated": bool(m),
    }


def load_model(folder: str, weights: str | None = None, banks_dir: str | None = None,
               device: str = "auto") -> RunModel:
    """:func:`load_run_model` plus one warm-up prediction on a blank image, so the first
    upload's time is the steady-state latency (the page caches the model per folder)."""
    model = load_run_model(folder, weights=weights or None, banks_dir=banks_dir or None,
                           device=device)
    size = model.preprocess.image_size
    predict(model, [np.zeros((size, size, 3), dtype=np.uint8)], threshold=0.0,
            maps=model.pixel_level, num_workers=0)
    return model


def short_weights(weights_id: str) -> str:
    """A weights id without its file hash, for display."""
    return weights_id.split(":sha256:")[0]


def format_score(value: float) -> str:
    return f"{value:.6g}"


def test_images(model: RunModel, limit: int = 500) -> pd.DataFrame:
    """The run's own test images that still exist (name, path, defect type, label, score)."""
    try:
        df = pd.read_csv(model.folder / "image_scores.csv", keep_default_na=False)
    except (OSError, ValueError):
        return pd.DataFrame(columns=["name", "path", "defect_type", "label", "score"])
    df = df[[Path(p).is_file() for p in df["path"]]].head(limit)
    names = [f"{d}/{Path(p).name}" for d, p in zip(df["defect_type"], df["path"], strict=True)]
    return pd.DataFrame({"name": names, "path": df["path"], "defect_type": df["defect_type"],
                         "label": df["label"], "score": df["score"]})


# --------------------------------------------------------------------------- uploads


@dataclass
class Upload:
    """One checked upload: the decoded RGB image, or why it was refused."""

    name: str
    image: Image.Image | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    digest: str = ""

    @property
    def ok(self) -> bool:
        return self.image is not None


def _display_name(name: str) -> str:
    base = PurePosixPath(str(name).replace("\\", "/")).name
    return "".join(c if c.isprintable() else "?" for c in base)[:120] or "upload"


def check_image_bytes(name: str, data: bytes, *, shown: bool = False) -> Upload:
    """Check and decode one uploaded image (see the module docstring); never raises.

    ``shown``: ``name`` is already a display name (a zip member's ``archive/file``)."""
    name = name if shown else _display_name(name)
    up = Upload(name=name, digest=hashlib.sha256(data).hexdigest())
    if not data:
        up.error = f"{name}: empty file"
        return up
    if len(data) > MAX_UPLOAD_BYTES:
        up.error = (f"{name}: {len(data) / 2**20:.1f} MB is over the {MAX_UPLOAD_BYTES >> 20} MB "
                    "limit")
        return up
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, mode, (w, h) = probe.format, probe.mode, probe.size
    except Image.DecompressionBombError:
        up.error = f"{name}: image too large (decompression bomb?); the limit is " \
                   f"{MAX_PIXELS / 1e6:.0f} megapixels"
        return up
    except Exception:  # PIL raises many types for non-images
        up.error = f"{name}: not an image PIL can read (accepted: {', '.join(IMAGE_TYPES)})"
        return up
    if fmt not in FORMATS:
        up.error = f"{name}: {fmt} images are not accepted (accepted: {', '.join(IMAGE_TYPES)})"
        return up
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        up.error = (f"{name}: image too large ({w}x{h} pixels, decompression bomb?); the limit "
                    f"is {MAX_PIXELS / 1e6:.0f} megapixels")
        return up
    suffix = "." + FORMATS[fmt].lower()
    try:
        with tempfile.TemporaryDirectory(prefix="patchbank-app-") as tmp, \
                warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            img = load_image(path)
    except PatchbankError as err:
        reason = str(err).split(": ", 1)[-1]
        up.error = f"{name}: {reason}"
        return up
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        up.error = f"{name}: image too large (decompression bomb?)"
        return up
    except Exception as err:  # a decoder bug must not take the page down
        up.error = f"{name}: cannot decode ({type(err).__name__})"
        return up
    if mode.startswith("I;16") or mode in ("I", "F"):
        up.notes.append(f"{mode} (16/32-bit) image scaled to 8-bit RGB by its bit depth")
    elif mode in ("L", "LA", "1"):
        up.notes.append(f"grayscale ({mode}) image converted to RGB")
    elif mode in ("RGBA", "PA", "P"):
        up.notes.append(f"{mode} image converted to RGB" + (" (alpha dropped)" if "A" in mode
                                                              else ""))
    elif mode == "CMYK":
        up.notes.append("CMYK image converted to RGB")
    up.image = img
    return up


def read_zip(name: str, data: bytes) -> tuple[list[tuple[str, bytes]], list[str], str | None]:
    """Image members of an uploaded zip, read in memory: ``(members, notes, error)``.

    ``error`` (the whole archive refused) for a corrupt zip, too many images or too many
    bytes; ``notes`` name every member skipped and why (unsafe path, junk, not an image, too
    large, suspicious compression, encrypted, unreadable).
    """
    name = _display_name(name)
    if len(data) > MAX_UPLOAD_BYTES:
        return [], [], f"{name}: {len(data) / 2**20:.1f} MB is over the " \
                       f"{MAX_UPLOAD_BYTES >> 20} MB limit"
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return [], [], f"{name}: not a readable zip archive"
    notes: list[str] = []
    picked = []
    for info in infos:
        member = info.filename
        shown = "".join(c if c.isprintable() else "?" for c in member)[:120]
        parts = PurePosixPath(member.replace("\\", "/")).parts
        if info.is_dir():
            continue
        if member.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            notes.append(f"{shown}: unsafe path (outside the archive), skipped")
            continue
        if member.startswith(JUNK_PREFIXES) or any(p.startswith(".") for p in parts):
            notes.append(f"{shown}: hidden or system file, skipped")
            continue
        if PurePosixPath(member).suffix.lower().lstrip(".") not in IMAGE_TYPES:
            notes.append(f"{shown}: not an image file, skipped")
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            notes.append(f"{shown}: {info.file_size / 2**20:.1f} MB uncompressed is over the "
                         f"{MAX_MEMBER_BYTES >> 20} MB limit, skipped")
            continue
        if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
            notes.append(f"{shown}: compressed {info.file_size // max(1, info.compress_size)}:1 "
                         "(zip bomb?), skipped")
            continue
        picked.append(info)
    if len(picked) > MAX_ZIP_IMAGES:
        return [], notes, (f"{name}: {len(picked)} images, the limit is {MAX_ZIP_IMAGES} per "
                           "archive; split it")
    if sum(i.file_size for i in picked) > MAX_ZIP_TOTAL_BYTES:
        return [], notes, (f"{name}: {sum(i.file_size for i in picked) / 2**20:.0f} MB of images "
                           f"uncompressed, the limit is {MAX_ZIP_TOTAL_BYTES >> 20} MB")
    members = []
    for info in picked:
        shown = "".join(c if c.isprintable() else "?" for c in info.filename)[:120]
        try:
            with zf.open(info) as f:
                content = f.read(MAX_MEMBER_BYTES + 1)  # never trust the header's size
        except RuntimeError:
            notes.append(f"{shown}: encrypted, skipped")
            continue
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
            notes.append(f"{shown}: unreadable ({type(err).__name__}), skipped")
            continue
        if len(content) > MAX_MEMBER_BYTES:
            notes.append(f"{shown}: larger than its header says, skipped")
            continue
        members.append((f"{name}/{_display_name(info.filename)}", content))
    return members, notes, None


def check_uploads(files: Sequence[tuple[str, bytes]]) -> tuple[list[Upload], list[str]]:
    """Uploaded (name, bytes) pairs -> checked images (zips expanded) and page notes."""
    uploads: list[Upload] = []
    notes: list[str] = []
    for name, data in files:
        if str(name).lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
            members, zip_notes, error = read_zip(name, data)
            notes.extend(zip_notes)
            if error:
                uploads.append(Upload(name=_display_name(name), error=error))
                continue
            if not members:
                notes.append(f"{_display_name(name)}: no images in the archive")
            uploads.extend(check_image_bytes(n, d, shown=True) for n, d in members)
        else:
            uploads.append(check_image_bytes(name, data))
    return uploads, notes


# --------------------------------------------------------------------------- predictions


def score_images(model: RunModel, images: Sequence[Image.Image], *,
                 threshold: str | float | Threshold | None = None,
                 pixel_threshold: str | float | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 max_side: int | None = None) -> list[Prediction]:
    """Predictions (with heatmaps for pixel-level runs) of decoded images, decoded in-process
    (no worker processes inside the app server). ``threshold`` None: the best available
    (:func:`safe_threshold`), or none (every image "good") when the run has no threshold."""
    if threshold is None:
        threshold = safe_threshold(model)[0] or Threshold(math.inf, "manual", "none available")
    return predict(model, list(images), threshold=threshold, pixel_threshold=pixel_threshold,
                   maps=model.pixel_level, keep_images=True, num_workers=0, max_side=max_side,
                   progress=progress)


def batch_results(model: RunModel, uploads: Sequence[Upload], *, threshold: str | float = "auto",
                  pixel_threshold: str | float | None = None, alpha: float = 0.5,
                  progress: Callable[[int, int], None] | None = None,
                  ) -> tuple[pd.DataFrame, list[tuple[np.ndarray, str, float]]]:
    """Score checked uploads: (table highest score first, gallery of (thumbnail, caption,
    score) highest first). Only thumbnails are kept, so memory stays small for big batches;
    their heatmaps are computed at thumbnail scale (scores do not depend on it)."""
    good = [u for u in uploads if u.ok]
    rows, gallery = [], []
    preds = iter_predict(model, [u.image for u in good], threshold=threshold,
                         pixel_threshold=pixel_threshold, maps=model.pixel_level,
                         keep_images=True, num_workers=0, max_side=2 * THUMB_SIDE,
                         progress=progress)
    for up, pred in zip(good, preds, strict=True):
        row = pred.row()
        row["path"] = up.name
        rows.append(row)
        picture = overlay(pred.image, pred.heatmap, pred.box, model.map_range, alpha, pred.mask)
        gallery.append((thumbnail(picture), f"{up.name} — {format_score(pred.score)} — "
                        f"{pred.decision}",
                        pred.score))
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.rename(columns={"path": "image"}).sort_values(
            "score", ascending=False, kind="stable").reset_index(drop=True)
    gallery.sort(key=lambda g: -g[2])
    return table, gallery


def safe_threshold(model: RunModel, spec: str | float = "auto") -> tuple[Threshold | None, str]:
    """(threshold, message): the asked-for image threshold or the best available one."""
    for attempt in (spec, "auto", "f1"):
        try:
            thr = model.image_threshold(attempt)
        except PatchbankError as err:
            last = str(err)
            continue
        msg = "" if attempt == spec else f"{spec} threshold unavailable; using {thr}"
        return thr, msg
    return None, last


def safe_pixel_threshold(model: RunModel, spec: str | float = "auto",
                         progress: Callable[[str], None] | None = None,
                         ) -> tuple[Threshold | None, str]:
    """(pixel threshold or None, message) without raising."""
    try:
        return model.pixel_threshold(spec, progress=progress), ""
    except PatchbankError as err:
        return None, str(err)


def table_csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def decide(score: float, threshold: float) -> str:
    return "anomalous" if score >= threshold else "good"


def render(model: RunModel, pred: Prediction, alpha: float = 0.5,
           pixel_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(overlay, mask image) of a prediction with a pixel threshold chosen on the page."""
    image = pred.image
    if pred.heatmap is None:
        return np.asarray(image), None
    mask = pred.heatmap >= pixel_threshold if pixel_threshold is not None else None
    picture = overlay(image, pred.heatmap, pred.box, model.map_range, alpha, mask)
    mask_img = None
    if mask is not None:
        full = np.zeros(image.shape[:2], dtype=np.uint8)
        ys, xs = pred.box
        region = full[ys, xs]
        if region.shape == mask.shape:
            full[ys, xs] = mask * 255
        else:
            full[ys, xs] = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (region.shape[1], region.shape[0]), Image.Resampling.NEAREST))
        mask_img = full
    return picture, mask_img


def thumbnail(picture: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    img = Image.fromarray(picture)
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(img)


def pixel_range(model: RunModel, preds: Sequence[Prediction] = ()) -> tuple[float, float]:
    """Slider range for the pixel threshold: the run's map range widened by these heatmaps."""
    lo, hi = model.map_range if model.map_range is not None else (math.inf, -math.inf)
    for p in preds:
        if p.heatmap is not None:
            lo, hi = min(lo, float(p.heatmap.min())), max(hi, float(p.heatmap.max()))
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1.0


def score_range(model: RunModel, extra: Sequence[float] = ()) -> tuple[float, float]:
    """Slider range for the image threshold: test scores, thresholds and ``extra`` scores."""
    values = list(extra)
    try:
        df = pd.read_csv(model.folder / "image_scores.csv", usecols=["score"])
        values += df["score"].tolist()
    except (OSError, ValueError):
        pass
    for spec in ("auto", "f1"):
        thr, _ = safe_threshold(model, spec)
        if thr is not None:
            values.append(thr.value)
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


# --------------------------------------------------------------------------- leaderboard


PERCENT_COLUMNS = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pro",
                   "best_dice", "image_score", "pixel_score", "overall_score", "f1_precision",
                   "f1_recall", "unsup_precision", "unsup_recall", "unsup_f1")


def leaderboard(scores_dir: Path | str) -> tuple[pd.DataFrame | None, str | None]:
    """The evaluate stage's ``leaderboard.csv`` (metrics in %, one decimal) and
    ``leaderboard.md`` (text)."""
    root = Path(scores_dir)
    table = text = None
    try:
        table = pd.read_csv(root / "leaderboard.csv")
        for col in PERCENT_COLUMNS:
            if col in table:
                table[col] = (100 * pd.to_numeric(table[col], errors="coerce")).round(1)
    except (OSError, ValueError):
        table = None
    try:
        text = (root / "leaderboard.md").read_text()
    except OSError:
        text = None
    return table, text


def run_figures(scores_dir: Path | str) -> dict[str, list[Path]]:
    """``<backbone>/<run>`` -> its figure PNGs (``<scores>/<backbone>/<run>/figures/``)."""
    out: dict[str, list[Path]] = {}
    for fig_dir in sorted(Path(scores_dir).glob("*/*/figures")):
        pngs = sorted(p for p in fig_dir.glob("*.png") if p.is_file())
        if pngs:
            out[f"{fig_dir.parent.parent.name}/{fig_dir.parent.name}"] = pngs
    return out


# --------------------------------------------------------------------------- quick model


def quick_model(images: Sequence[Image.Image], *, backbone: str = "efficientnet_lite0",
                method: str = "patchcore", weights: str = "hub", image_size: int | None = None,
                params: dict[str, Any] | None = None, device: str = "cpu",
                progress: Callable[[str], None] | None = None) -> RunModel:
    """A model fitted in memory on a few good images (nothing written anywhere).

    Features go through the same path as the extract stage; with 4 or more images, 20 % (at
    least 2) are held out, as the score stage does, for the unsupervised image and pixel
    thresholds.
    """
    from patchbank.evaluation.holdout import fit_with_holdout
    from patchbank.features.extractors import build_extractor
    from patchbank.features.preprocess import Preprocess
    from patchbank.inference.model import UNSUPERVISED
    from patchbank.scorers import make_scorer

    images = list(images)
    if len(images) < 2:
        raise PatchbankError("quick model: upload at least 2 good images (5+ for thresholds)")
    if progress:
        progress("building the backbone")
    try:
        scorer = make_scorer(method, params, device=device)
    except ValueError as err:
        raise PatchbankError(f"quick model: {err}") from None
    extractor, xinfo = build_extractor(backbone, weights=weights, image_size=image_size,
                                       device=device)
    scorer.input_size = xinfo.image_size
    preprocess = Preprocess(xinfo.image_size, xinfo.mean, xinfo.std)
    info = RunInfo(
        method=method, params=scorer.params, holdout=0.2, seed=0, backbone=backbone,
        category="uploaded", run=f"quick-{method}",
        banks={"train": {"backbone": backbone, "weights": xinfo.weights_id,
                         "layers": list(xinfo.layers), "image_size": xinfo.image_size,
                         "crop": None, "mean": list(xinfo.mean), "std": list(xinfo.std)}},
        pixel_level=scorer.pixel_level, map_sigma=float(scorer.map_sigma),
        input_size=xinfo.image_size, image_size=xinfo.image_size, crop=None)
    import torch

    model = RunModel(folder=Path("<memory>"), info=info, scorer=scorer, extractor=extractor,
                     extractor_info=xinfo, preprocess=preprocess, device=torch.device(device),
                     metrics=None, train_scores=None, holdout_map_max=None, banks_dir=None,
                     map_range=None)
    if progress:
        progress(f"extracting features of {len(images)} images")
    taps = quick_features(model, images)
    if progress:
        progress(f"fitting {method} (and, held out, the thresholds)")
    fitted = fit_with_holdout(scorer, taps, quick_split(len(images)),
                              geometry=info.geometry, heights=[im.height for im in images],
                              widths=[im.width for im in images])
    info.fit_s = round(fitted.fit_s or 0.0, 3)
    if fitted.held_scores is not None:
        model.train_scores = fitted.held_scores
    if fitted.held_map_max is not None and fitted.held_map_min is not None:
        value = fitted.pixel_threshold()
        model._pixel_cache["auto"] = Threshold(
            value, UNSUPERVISED, f"mean + 3σ of the map maxima of {len(fitted.held_out)} "
            "held-out images")
        lo, hi = float(fitted.held_map_min.min()), float(fitted.held_map_max.max())
        model.map_range = (lo, max(hi, value) * 2 - lo)
    return model


def preselect(runs: pd.DataFrame, backbone: str | None = None, method: str | None = None,
              run: str | None = None, category: str | None = None) -> pd.DataFrame:
    """The rows of :func:`run_table` the app's launch options select (``--backbone``,
    ``--method``, ``--run`` name or unique prefix, ``--category``); all rows for options not
    given. An empty result means nothing matched (the launcher refuses that before starting)."""
    sub = runs
    if backbone:
        sub = sub[sub["backbone"] == backbone]
    if method:
        sub = sub[sub["method"] == method]
    if run:
        exact = sub[sub["run"] == run]
        sub = exact if not exact.empty else sub[sub["run"].str.startswith(run)]
    if category:
        sub = sub[sub["category"] == category]
    return sub


def quick_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The quick model's (fit, held-out) split of ``n`` images: 20 % (at least 2) held out
    with seed 0, none below 4 images (:func:`patchbank.evaluation.holdout.holdout_split`)."""
    from patchbank.evaluation.holdout import holdout_split

    return holdout_split(n, max(0.2, 2 / n), 0)


def quick_features(model: RunModel, images: Sequence[Image.Image]) -> dict[int, np.ndarray]:
    """The images' taps through the model's feature path, 16 at a time."""
    import torch

    from patchbank.inference.predict import features

    pixels = torch.stack([model.preprocess.resize(im) for im in images])
    taps: dict[int, list[np.ndarray]] = {}
    for lo in range(0, len(images), 16):
        for k, v in features(model, pixels[lo:lo + 16]).items():
            taps.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in taps.items()}
