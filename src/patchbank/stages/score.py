"""Score stage: feature banks -> image scores and anomaly maps (see :mod:`patchbank.store.runs`).

Reads banks only: no images, no backbone. A run is skipped when its ``run.json`` records the
same method, parameters and bank fingerprints; otherwise it is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank import __version__
from patchbank.core.atomic import file_lock, sweep_stale_temporaries
from patchbank.core.errors import BankError, PatchbankError
from patchbank.evaluation.holdout import (  # noqa: F401  (re-exported: the score stage's API)
    HoldoutFit,
    fit_bank,
    fit_with_holdout,
    holdout_rows,
    holdout_split,
    shot_indices,
    shot_rows,
    subset_bank,
)
from patchbank.scorers import make_scorer
from patchbank.scorers.base import Scorer
from patchbank.store.banks import (
    SPLITS,
    Bank,
    BankPaths,
    extract_command,
    find_tags,
    load_pair,
)
from patchbank.store.banks import fingerprint_diff as _diff
from patchbank.store.records import RunInfo
from patchbank.store.runs import (
    SCORE_COLUMNS,
    RunPaths,
    read_run_info,
    verify_run,
    write_run,
)

log = logging.getLogger(__name__)

#: run.json keys that decide whether an existing run can be reused.
RUN_KEYS = ("method", "params", "holdout", "seed", "shots", "banks", "patchbank_version")
#: the fitted scorer, saved beside run.json (see ``Scorer.save``).
MODEL_FILE = "model.npz"


def resolve_tag(banks_dir: Path, backbone: str, category: str, tag: str | None = None) -> str:
    """The bank configuration to score: ``tag`` (exact or a unique prefix), or the only one."""
    tags = find_tags(banks_dir, backbone, category)
    if not tags:
        # an extraction that never finished leaves bank files but no test fingerprint: say so
        started = sorted({p.parent.parent.name for p in Path(banks_dir, backbone).glob(
            f"*/{category}/*") if p.name.split(".")[0] in SPLITS})
        if started and (tag is None or any(t.startswith(tag) for t in started)):
            t = next(t for t in started if tag is None or t.startswith(tag))
            raise BankError(
                f"{BankPaths.of(banks_dir, backbone, t, category, 'test').json}: test bank "
                f"missing (extraction unfinished?); re-run "
                f"`{extract_command(banks_dir, backbone, t, category)}`")
        hint = (f"run `python scripts/extract.py --backbone {backbone} --category {category} "
                f"--data-root DATA_ROOT --banks-dir {banks_dir}` first")
        raise BankError(f"{Path(banks_dir, backbone)}: no {category} banks; {hint}")
    if tag is None:
        if len(tags) > 1:
            raise BankError(f"{Path(banks_dir, backbone)}: {len(tags)} bank configurations for "
                            f"{category} ({', '.join(tags)}); choose one with --bank TAG")
        return tags[0]
    found = [t for t in tags if t == tag] or [t for t in tags if t.startswith(tag)]
    if len(found) != 1:
        raise BankError(f"--bank {tag}: {'ambiguous' if found else 'no such bank'} for "
                        f"{backbone}/{category}; known: {', '.join(tags)}")
    return found[0]


def run_name(method: str, params: Mapping[str, Any], tag: str, holdout: float,
             seed: int, shots: int | None = None) -> str:
    """Score-run folder: method, the bank tag's readable part, and a hash of the whole spec.

    ``shots=None`` (every training image) leaves the hash as it was before few-shot runs
    existed, so existing run folders keep their names.
    """
    spec: dict[str, Any] = {"method": method, "params": dict(params), "bank": tag,
                            "holdout": holdout, "seed": seed}
    if shots is not None:
        spec["shots"] = int(shots)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    readable = tag.rsplit("-", 1)[0]
    return f"{method}-{readable}-{digest.hexdigest()[:8]}"


def check_finite(bank: Bank, banks_dir: Path, backbone: str, tag: str, category: str,
                 split: str) -> None:
    """Refuse a bank holding NaN or inf (float16 overflow) before any fitting."""
    for layer, arr in bank.taps.items():
        step = max(1, (1 << 24) // max(1, int(np.prod(arr.shape[1:]))))
        for lo in range(0, len(arr), step):
            if not np.isfinite(arr[lo:lo + step]).all():
                path = BankPaths.of(banks_dir, backbone, tag, category, split).tap(layer)
                raise BankError(
                    f"{path}: NaN/inf features (images {lo}..{min(lo + step, len(arr)) - 1}); "
                    f"re-extract: `{extract_command(banks_dir, backbone, tag, category)} "
                    "--overwrite`")


def input_size(bank: Bank) -> int:
    """Side of the square model input the grid was computed on (the crop when cropping)."""
    return int(bank.record.crop or bank.record.image_size)


def score_category(
    banks_dir: Path,
    scores_dir: Path,
    backbone: str,
    method: str,
    category: str,
    params: Mapping[str, Any] | None = None,
    *,
    bank: str | None = None,
    name: str | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    shots: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> tuple[str, str]:
    """Fit ``method`` on the train bank and score the test bank; returns (run folder name,
    what happened).

    ``bank`` picks the bank configuration (its tag, or a unique prefix; default: the only one).
    The run lives in ``<scores_dir>/<backbone>/<name>/<category>``, ``name`` defaulting to
    :func:`run_name`, so other parameters or banks never overwrite it. ``holdout`` > 0 also
    fits on the rest of the training set and scores the held-out part, so the evaluate stage
    can set an unsupervised threshold (mean + 3 sigma of those scores).

    ``shots`` (few-shot protocol): fit on ``shots`` training images drawn from the train bank
    with ``seed`` (no re-extraction; the full test set is scored); ``None`` uses all of them.
    The hold-out then splits those shots, and is skipped (``holdout_applied: false`` in
    ``run.json``) when fewer than 2 would be held out or left to fit.
    """
    try:
        scorer = make_scorer(method, params, device=device)
    except ValueError as err:
        raise PatchbankError(f"--method {method}: {err}") from None
    tag, train, test, shots = _open_banks(banks_dir, backbone, category, bank, shots)
    scorer.input_size = input_size(test)
    name = name or run_name(method, scorer.params, tag, holdout, seed, shots)
    paths = RunPaths.of(scores_dir, backbone, name, category)
    info = RunInfo(method=method, params=scorer.params, holdout=holdout, seed=seed,
                   shots=shots, banks={"train": train.fingerprint, "test": test.fingerprint},
                   patchbank_version=__version__)
    # One writer per run folder: a second score (or evaluate) run waits, then finds it done.
    with file_lock(paths.lock, on_wait=lambda: log.info(
            "%s: another score or evaluate run is writing it; waiting", paths.folder)):
        sweep_stale_temporaries(paths.folder)  # left by killed runs
        status = _reuse_status(paths, info, overwrite)
        if status == "skipped":
            return name, status
        chosen, _ = shot_rows(train.meta, shots, seed)
        info.n_train_bank = len(train)
        info.train_indices = chosen.tolist() if shots is not None else None
        train = fit_bank(train, shots, seed)
        _fit_score_write(scorer, backbone, category, name, tag, train, test, paths, info)
    return name, status


def _open_banks(banks_dir: Path, backbone: str, category: str, bank: str | None,
                shots: int | None) -> tuple[str, Bank, Bank, int | None]:
    """(tag, train bank, test bank, shots as an int or None). Both banks are validated
    (files, shapes, train/test consistency, finite values) before anything is fitted, and
    ``shots`` refused unless 1 .. the train bank's number of images."""
    tag = resolve_tag(banks_dir, backbone, category, bank)
    train, test = load_pair(banks_dir, backbone, tag, category)
    check_finite(test, banks_dir, backbone, tag, category, "test")
    n_images = int((train.meta["augment"] == 0).sum()) if "augment" in train.meta.columns \
        else len(train)
    if shots is not None and not 1 <= int(shots) <= n_images:
        raise PatchbankError(
            f"--shots {shots}: {BankPaths.of(banks_dir, backbone, tag, category, 'train').csv}"
            f" has {n_images} training images; choose 1..{n_images} or leave it out (all)")
    return tag, train, test, None if shots is None else int(shots)


def _reuse_status(paths: RunPaths, info: RunInfo, overwrite: bool) -> str:
    """What to do with the run folder: ``"skipped"`` (its complete run has this
    configuration), else how it will be written (``computed``, ``recomputed``,
    ``overwritten``)."""
    old = read_run_info(paths)
    if old is None:
        if paths.run_json.exists():
            log.warning("%s: unreadable run.json, recomputing", paths.folder)
            return "recomputed"
        return "computed"
    new = info.to_json()
    diff = _diff({k: old.get(k) for k in RUN_KEYS}, {k: new[k] for k in RUN_KEYS})
    damaged = [] if diff else verify_run(paths, old)
    if not diff and not damaged and not overwrite:
        log.info("%s: up to date, skipped", paths.folder)
        return "skipped"
    if diff:
        log.warning("%s: configuration changed (%s), recomputing", paths.folder,
                    "; ".join(d[:120] for d in diff))
    elif damaged:
        log.warning("%s: damaged (%s), recomputing", paths.folder, "; ".join(damaged))
    return "overwritten" if not diff and not damaged else "recomputed"


def _fit_score_write(scorer: Scorer, backbone: str, category: str, name: str, tag: str,
                     train: Bank, test: Bank, paths: RunPaths, info: RunInfo) -> None:
    """Fit, score, hold out (:func:`fit_with_holdout`), and write the run (``run.json``
    last)."""
    split = holdout_rows(train.meta, info.holdout, info.seed)
    info.holdout_applied = bool(len(split[1]))
    if info.holdout > 0 and not len(split[1]):
        log.info("%s/%s: %d training images are too few for a %.0f %% hold-out (needs >= 2 "
                 "held out and >= 2 left); no unsupervised threshold", backbone, category,
                 len(train), 100 * info.holdout)
    geometry = {"image_size": test.record.image_size, "crop": test.record.crop,
                "input_size": input_size(test), "map_sigma": float(scorer.map_sigma)}
    try:
        fitted = fit_with_holdout(scorer, train.taps, split, test=test.taps, geometry=geometry,
                                  heights=train.meta["height"], widths=train.meta["width"])
    except ValueError as err:
        raise PatchbankError(f"--method {info.method}: {err}") from None
    maps = fitted.test_maps
    # The old run stops counting as complete before its model is replaced.
    paths.run_json.unlink(missing_ok=True)
    paths.folder.mkdir(parents=True, exist_ok=True)
    model_bytes = scorer.save(paths.model)
    log.info("%s %s/%s: fit %.1f s, score %.1f s", info.method, backbone, category,
             fitted.fit_s, fitted.score_s)
    meta = test.meta
    table = pd.DataFrame({
        "path": meta["path"], "defect_type": meta["defect_type"], "label": meta["label"],
        "score": np.asarray(fitted.test_scores, dtype=np.float64),
        "mask_path": meta["mask_path"], "height": meta["height"], "width": meta["width"],
    })[SCORE_COLUMNS]
    info.backbone, info.bank, info.run, info.category = backbone, tag, name, category
    info.layers = list(scorer.layers_)
    info.pixel_level = maps is not None
    info.map_sigma, info.input_size = geometry["map_sigma"], geometry["input_size"]
    info.crop, info.image_size = geometry["crop"], geometry["image_size"]
    info.grid = list(maps.shape[1:]) if maps is not None else None
    info.n_train, info.n_test = len(train), len(test)
    info.fit_s, info.score_s = round(fitted.fit_s or 0.0, 3), round(fitted.score_s or 0.0, 3)
    info.holdout_fit_score_s = None if fitted.holdout_s is None else round(fitted.holdout_s, 3)
    info.model = {"file": MODEL_FILE, "bytes": model_bytes}
    write_run(paths, table, maps, _held_out_table(train, fitted), info)


def _held_out_table(train: Bank, fitted: HoldoutFit) -> pd.DataFrame | None:
    """``train_scores.csv``: the held-out images' paths and scores, and for pixel-level runs
    their placed maps' maxima (the unsupervised pixel threshold's inputs, so predict needs no
    refit for it); None without a hold-out."""
    if fitted.held_scores is None:
        return None
    table = pd.DataFrame({"path": train.meta["path"].to_numpy()[fitted.held_out],
                          "score": fitted.held_scores})
    if fitted.held_map_max is not None:
        table["map_max"] = fitted.held_map_max
    return table
