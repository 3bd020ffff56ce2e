"""Score-output file format: the contract between the score and evaluate stages.

One method run on one category lives in ``<scores_dir>/<backbone>/<method>/<category>/``:

- ``image_scores.csv`` — one row per test image in bank order, columns :data:`SCORE_COLUMNS`
  (``score``: higher = more anomalous; ``mask_path`` empty for good images);
- ``maps.npz`` — key ``maps``: (N, h, w) float32 anomaly maps on the feature grid (absent for
  image-level methods);
- ``train_scores.csv`` — ``path, score`` for held-out training images (for an unsupervised
  threshold; absent when hold-out is disabled);
- ``run.json`` — method, resolved parameters, the fingerprints of the banks read, model input
  size, map smoothing sigma, fit and score seconds. Written last: a run is complete when it
  exists, and is reused only when its configuration matches;
- ``metrics.json`` — written by the evaluate stage (see :mod:`patchbank.stages.evaluate`).

Every file goes through a temporary name and a rename (:mod:`patchbank.core.atomic`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank.core.atomic import (
    atomic_open,
    atomic_path,
    atomic_write_text,
    sweep_stale_temporaries,
)
from patchbank.core.errors import ScoresError

SCORE_COLUMNS = ["path", "defect_type", "label", "score", "mask_path", "height", "width"]
#: run.json keys that place a pixel-level run's maps on the images (numbers; ``crop`` optional).
MAP_KEYS = ("map_sigma", "input_size", "image_size")


def map_info_problems(info: Mapping[str, Any]) -> list[str]:
    """What keeps ``info`` from placing maps on images (empty when it is well-formed)."""
    problems = []
    for key in MAP_KEYS:
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key} missing" if value is None else f"{key} = {value!r}")
        elif not (value >= 0 if key == "map_sigma" else value > 0):  # NaN fails both
            problems.append(f"{key} = {value!r}")
    crop = info.get("crop")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop <= 0):
        problems.append(f"crop = {crop!r}")
    return problems


@dataclass(frozen=True)
class RunPaths:
    """Files of one (backbone, method, category) score run."""

    folder: Path

    @classmethod
    def of(cls, scores_dir: Path, backbone: str, method: str, category: str) -> RunPaths:
        return cls(Path(scores_dir) / backbone / method / category)

    @property
    def image_scores(self) -> Path:
        return self.folder / "image_scores.csv"

    @property
    def maps(self) -> Path:
        return self.folder / "maps.npz"

    @property
    def train_scores(self) -> Path:
        return self.folder / "train_scores.csv"

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    @property
    def metrics_json(self) -> Path:
        """The evaluate stage's per-category result (see :mod:`patchbank.stages.evaluate`)."""
        return self.folder / "metrics.json"


@dataclass
class ScoreRun:
    """A loaded run: per-image scores, maps (or None), held-out train scores, and run info."""

    scores: pd.DataFrame
    maps: np.ndarray | None
    train_scores: np.ndarray | None
    info: dict[str, Any]


def write_run(
    paths: RunPaths,
    scores: pd.DataFrame,
    maps: np.ndarray | None,
    train_scores: pd.DataFrame | None,
    info: Mapping[str, Any],
) -> None:
    """Write a run; ``run.json`` goes last (and the old one first) so partial runs never count."""
    if list(scores.columns) != SCORE_COLUMNS:
        raise ValueError(f"scores must have columns {SCORE_COLUMNS}")
    if maps is not None and len(maps) != len(scores):
        raise ValueError("one map per scored image expected")
    paths.folder.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(paths.folder)
    paths.run_json.unlink(missing_ok=True)
    with atomic_path(paths.image_scores) as tmp:
        scores.to_csv(tmp, index=False)
    if maps is not None:
        with atomic_open(paths.maps) as f:
            np.savez(f, maps=maps.astype(np.float32, copy=False))
    else:
        paths.maps.unlink(missing_ok=True)
    if train_scores is not None:
        with atomic_path(paths.train_scores) as tmp:
            train_scores.to_csv(tmp, index=False)
    else:
        paths.train_scores.unlink(missing_ok=True)
    atomic_write_text(paths.run_json, json.dumps(dict(info), indent=2))


def read_run_info(paths: RunPaths) -> dict[str, Any] | None:
    """``run.json`` of a complete run, or None."""
    try:
        return json.loads(paths.run_json.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_run(paths: RunPaths) -> ScoreRun:
    """Load a complete run or raise :class:`ScoresError` saying how to produce it."""
    info = read_run_info(paths)
    if info is None:
        parts = paths.folder.parts
        hint = (
            f"python scripts/score.py --backbone {parts[-3]} --method {parts[-2]} "
            f"--category {parts[-1]}"
            if len(parts) >= 3
            else "python scripts/score.py"
        )
        raise ScoresError(f"{paths.folder}: no complete score run; run `{hint}` first")
    try:
        scores = pd.read_csv(paths.image_scores, keep_default_na=False, dtype={"mask_path": str})
        maps = None
        if info.get("pixel_level"):
            with np.load(paths.maps) as npz:
                maps = npz["maps"]
        train = None
        if paths.train_scores.is_file():
            train = pd.read_csv(paths.train_scores)["score"].to_numpy(np.float64)
    except (OSError, ValueError, KeyError) as err:
        raise ScoresError(
            f"{paths.folder}: unreadable score files ({err}); re-score with --overwrite"
        ) from None
    if list(scores.columns) != SCORE_COLUMNS or (maps is not None and len(maps) != len(scores)):
        raise ScoresError(f"{paths.image_scores}: malformed; re-score with --overwrite")
    problems = map_info_problems(info) if maps is not None else []
    if problems:
        raise ScoresError(f"{paths.run_json}: malformed pixel-level run ({', '.join(problems)}); "
                          "re-score with --overwrite")
    return ScoreRun(scores=scores, maps=maps, train_scores=train, info=info)
