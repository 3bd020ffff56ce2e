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
  exists, and is reused only when its configuration matches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank.core.errors import ScoresError

SCORE_COLUMNS = ["path", "defect_type", "label", "score", "mask_path", "height", "width"]


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


@dataclass
class ScoreRun:
    """A loaded run: per-image scores, maps (or None), held-out train scores, and run info."""

    scores: pd.DataFrame
    maps: np.ndarray | None
    train_scores: np.ndarray | None
    info: dict[str, Any]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
    paths.run_json.unlink(missing_ok=True)
    _atomic_write(paths.image_scores, lambda p: scores.to_csv(p, index=False))
    if maps is not None:
        with open(paths.maps.with_name(".maps.npz.tmp"), "wb") as f:
            np.savez(f, maps=maps.astype(np.float32, copy=False))
        os.replace(paths.maps.with_name(".maps.npz.tmp"), paths.maps)
    else:
        paths.maps.unlink(missing_ok=True)
    if train_scores is not None:
        _atomic_write(paths.train_scores, lambda p: train_scores.to_csv(p, index=False))
    else:
        paths.train_scores.unlink(missing_ok=True)
    _atomic_write(paths.run_json, lambda p: p.write_text(json.dumps(dict(info), indent=2)))


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
    return ScoreRun(scores=scores, maps=maps, train_scores=train, info=info)
