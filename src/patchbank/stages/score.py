"""Score stage: feature banks -> image scores and anomaly maps (see :mod:`patchbank.store.runs`).

Reads banks only: no images, no backbone. A run is skipped when its ``run.json`` records the
same method, parameters and bank fingerprints; otherwise it is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank import __version__
from patchbank.core.errors import PatchbankError
from patchbank.scorers import make_scorer
from patchbank.store.banks import Bank, load_pair
from patchbank.store.banks import fingerprint_diff as _diff
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, read_run_info, write_run

log = logging.getLogger(__name__)

#: run.json keys that decide whether an existing run can be reused.
RUN_KEYS = ("method", "params", "holdout", "seed", "banks", "patchbank_version")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` training images into (fit, held-out) index arrays."""
    n_out = int(round(n * fraction))
    if fraction <= 0 or n_out < 2 or n - n_out < 2:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def input_size(bank: Bank) -> int:
    """Side of the square model input the grid was computed on (the crop when cropping)."""
    return int(bank.fingerprint.get("crop") or bank.fingerprint["image_size"])


def score_category(
    banks_dir: Path,
    scores_dir: Path,
    backbone: str,
    method: str,
    category: str,
    params: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
) -> str:
    """Fit ``method`` on the train bank and score the test bank; returns what happened.

    ``holdout`` > 0 also fits on the rest of the training set and scores the held-out part, so
    the evaluate stage can set an unsupervised threshold (mean + 3 sigma of those scores).
    """
    train, test = load_pair(banks_dir, backbone, category)
    try:
        scorer = make_scorer(method, params, device=device)
    except ValueError as err:
        raise PatchbankError(f"--method {method}: {err}") from None
    paths = RunPaths.of(scores_dir, backbone, name or method, category)
    info: dict[str, Any] = {
        "method": method,
        "params": scorer.params,
        "holdout": holdout,
        "seed": seed,
        "banks": {"train": train.fingerprint, "test": test.fingerprint},
        "patchbank_version": __version__,
    }
    old = read_run_info(paths)
    status = "computed"
    if old is not None:
        diff = _diff({k: old.get(k) for k in RUN_KEYS}, {k: info[k] for k in RUN_KEYS})
        if not diff and not overwrite:
            log.info("%s: up to date, skipped", paths.folder)
            return "skipped"
        status = "overwritten" if not diff else "recomputed"
        if diff:
            log.warning("%s: configuration changed (%s), recomputing", paths.folder,
                        "; ".join(d[:120] for d in diff))

    t0 = time.perf_counter()
    scorer.fit(train.features)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps = scorer.score(test.features)
    score_s = time.perf_counter() - t0
    log.info("%s %s/%s: fit %.1f s, score %.1f s", method, backbone, category, fit_s, score_s)

    train_scores = None
    fit_idx, out_idx = holdout_split(len(train.features), holdout, seed)
    if len(out_idx):
        held = make_scorer(method, scorer.params, device=device).fit(train.features[fit_idx])
        held_scores, _ = held.score(train.features[out_idx])
        train_scores = pd.DataFrame(
            {"path": train.meta["path"].to_numpy()[out_idx], "score": held_scores}
        )

    meta = test.meta
    table = pd.DataFrame({
        "path": meta["path"], "defect_type": meta["defect_type"], "label": meta["label"],
        "score": np.asarray(scores, dtype=np.float64), "mask_path": meta["mask_path"],
        "height": meta["height"], "width": meta["width"],
    })[SCORE_COLUMNS]
    info.update({
        "backbone": backbone,
        "category": category,
        "pixel_level": maps is not None,
        "map_sigma": float(scorer.map_sigma),
        "input_size": input_size(test),
        "crop": test.fingerprint.get("crop"),
        "image_size": test.fingerprint["image_size"],
        "grid": list(test.grid),
        "n_train": len(train.features),
        "n_test": len(test.features),
        "fit_s": round(fit_s, 3),
        "score_s": round(score_s, 3),
    })
    write_run(paths, table, maps, train_scores, info)
    return status
