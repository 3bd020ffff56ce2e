"""Score-output file format: the contract between the score and evaluate stages.

One method run on one category lives in ``<scores_dir>/<backbone>/<method>/<category>/``:

- ``image_scores.csv`` — one row per test image in bank order, columns :data:`SCORE_COLUMNS`
  (``score``: higher = more anomalous; ``mask_path`` empty for good images);
- ``maps.npz`` — key ``maps``: (N, h, w) float32 anomaly maps on the feature grid (absent for
  image-level methods);
- ``train_scores.csv`` — ``path, score`` for held-out training images (for an unsupervised
  threshold; absent when hold-out is disabled), plus ``map_max`` for pixel-level methods: the
  maximum of each image's smoothed map at image resolution (the unsupervised pixel threshold);
- ``run.json`` — method, resolved parameters, the fingerprints of the banks read, model input
  size, map smoothing sigma, fit and score seconds. Written last: a run is complete when it
  exists, and is reused only when its configuration matches;
- ``metrics.json`` — written by the evaluate stage (see :mod:`patchbank.stages.evaluate`).

Every file goes through a temporary name and a rename (:mod:`patchbank.core.atomic`).
"""

from __future__ import annotations

import json
import shlex
import zipfile
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
from patchbank.store.records import RunInfo

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
    def lock(self) -> Path:
        """Lock file serialising the score and evaluate runs that write this folder:
        ``<scores_dir>/.locks/<backbone>/<run>/<category>.lock`` (outside the run folders)."""
        *_, backbone, name, category = self.folder.parts
        return self.folder.parents[2] / ".locks" / backbone / name / f"{category}.lock"

    @property
    def model(self) -> Path:
        """The fitted scorer (see ``patchbank.scorers.load_scorer``)."""
        return self.folder / "model.npz"

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

    @property
    def record(self) -> RunInfo:
        """``info`` as a validated :class:`RunInfo`."""
        return RunInfo.from_json(self.info, "run.json")


def write_run(
    paths: RunPaths,
    scores: pd.DataFrame,
    maps: np.ndarray | None,
    train_scores: pd.DataFrame | None,
    info: RunInfo | Mapping[str, Any],
) -> None:
    """Write a run; ``run.json`` goes last (and the old one first) so partial runs never count.
    ``info``: the :class:`RunInfo` (or its JSON object) written as ``run.json``."""
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
    data = info.to_json() if isinstance(info, RunInfo) else dict(info)
    atomic_write_text(paths.run_json, json.dumps(data, indent=2))


def read_run_info(paths: RunPaths) -> dict[str, Any] | None:
    """``run.json`` of a complete run (a JSON object), or None."""
    try:
        info = json.loads(paths.run_json.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def score_command(paths: RunPaths, info: Mapping[str, Any] | None = None) -> str:
    """The score command that (re)writes this run folder: from ``info`` (its ``run.json``) when
    given, else the method guessed from the folder name, with ``--name`` for that folder."""
    parts = paths.folder.parts
    if len(parts) < 3:
        return "python scripts/score.py"
    scores_dir = Path(*parts[:-3]) if len(parts) > 3 else Path(".")
    backbone, name, category = parts[-3:]
    info = info or {}
    method = info.get("method") if isinstance(info.get("method"), str) else name.split("-")[0]
    args = ["python", "scripts/score.py", "--backbone", backbone, "--method", method,
            "--category", category, "--scores-dir", str(scores_dir)]
    params = info.get("params")
    if isinstance(params, dict):
        args += [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    if isinstance(info.get("bank"), str):
        args += ["--bank", info["bank"]]
    if isinstance(info.get("holdout"), int | float) and info["holdout"] != 0.2:
        args += ["--holdout", str(info["holdout"])]
    if name != method:
        args += ["--name", name]
    return " ".join(shlex.quote(a) for a in args)


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable ``.npz``, else None. Reads the archive's directory (at its
    end, so a truncated or empty file fails), not the arrays."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        return f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None if names else "empty archive"


def verify_run(paths: RunPaths, info: Mapping[str, Any]) -> list[str]:
    """Problems with the files a complete-looking run names (empty when they are all readable):
    the score table's rows and columns, the maps and model archives (``model.npz`` also of the
    size ``run.json`` records). Cheap: archives are checked by their directory, not read."""
    problems = []
    try:
        scores = pd.read_csv(paths.image_scores, keep_default_na=False, dtype={"mask_path": str})
        if list(scores.columns) != SCORE_COLUMNS:
            problems.append(f"{paths.image_scores.name}: columns {list(scores.columns)}")
        elif isinstance(info.get("n_test"), int) and len(scores) != info["n_test"]:
            problems.append(f"{paths.image_scores.name}: {len(scores)} rows for "
                            f"{info['n_test']} test images")
    except (OSError, ValueError) as err:
        problems.append(f"{paths.image_scores.name}: {str(err).splitlines()[0]}")
    if info.get("pixel_level"):
        bad = _zip_problem(paths.maps)
        if bad:
            problems.append(f"{paths.maps.name}: {bad}")
    model = info.get("model")
    if isinstance(model, dict) and isinstance(model.get("file"), str):
        path = paths.folder / Path(model["file"]).name
        bad = _zip_problem(path)
        if bad:
            problems.append(f"{path.name}: {bad}")
        elif isinstance(model.get("bytes"), int) and path.stat().st_size != model["bytes"]:
            problems.append(f"{path.name}: {path.stat().st_size} bytes, run.json says "
                            f"{model['bytes']}")
    return problems


def load_run(paths: RunPaths) -> ScoreRun:
    """Load a complete run or raise :class:`ScoresError` saying how to produce it."""
    info = read_run_info(paths)
    if info is None:
        state = "unreadable run.json" if paths.run_json.exists() else "no complete score run"
        raise ScoresError(f"{paths.folder}: {state}; run `{score_command(paths)}` first"
                          + (" with --overwrite" if paths.run_json.exists() else ""))
    fix = f"re-score with --overwrite: `{score_command(paths, info)} --overwrite`"
    record = RunInfo.from_json(info, paths.run_json, fix)
    try:
        scores = pd.read_csv(paths.image_scores, keep_default_na=False, dtype={"mask_path": str})
        maps = None
        if record.pixel_level:
            with np.load(paths.maps, allow_pickle=False) as npz:
                maps = npz["maps"]
        train = None
        if paths.train_scores.is_file():
            train = pd.read_csv(paths.train_scores)["score"].to_numpy(np.float64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        what = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ScoresError(f"{paths.folder}: unreadable score files ({what}); {fix}") from None
    if list(scores.columns) != SCORE_COLUMNS or (maps is not None and len(maps) != len(scores)):
        raise ScoresError(f"{paths.image_scores}: malformed; {fix}")
    problems = map_info_problems(info) if maps is not None else []
    if problems:
        raise ScoresError(f"{paths.run_json}: malformed pixel-level run ({', '.join(problems)}); "
                          f"{fix}")
    return ScoreRun(scores=scores, maps=maps, train_scores=train, info=info)
