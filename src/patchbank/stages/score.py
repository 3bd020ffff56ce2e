"""Score stage: feature banks -> image scores and anomaly maps (see :mod:`patchbank.store.runs`).

Reads banks only: no images, no backbone. A run is skipped when its ``run.json`` records the
same method, parameters and bank fingerprints; otherwise it is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank import __version__
from patchbank.core.atomic import file_lock, sweep_stale_temporaries
from patchbank.core.errors import BankError, PatchbankError
from patchbank.evaluation.heatmap import map_maxima
from patchbank.scorers import make_scorer
from patchbank.store.banks import (
    SPLITS,
    Bank,
    BankPaths,
    extract_command,
    find_tags,
    load_pair,
)
from patchbank.store.banks import fingerprint_diff as _diff
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


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` training images into (fit, held-out) index arrays."""
    n_out = int(round(n * fraction))
    if fraction <= 0 or n_out < 2 or n - n_out < 2:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def shot_indices(n: int, shots: int | None, seed: int) -> np.ndarray:
    """Training rows a run fits on: all ``n``, or a seeded sorted subset of ``shots`` of them."""
    if shots is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(shots), replace=False))


def shot_rows(meta: pd.DataFrame, shots: int | None, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen training images' bank rows, every bank row fitted on). Banks extracted with
    ``--augment`` draw the shots among the original images and keep each one's augmented
    copies (the ``augment``/``augment_of`` columns), so a shot is an image, not a copy."""
    augmented = "augment" in meta.columns and "augment_of" in meta.columns
    originals = np.flatnonzero(meta["augment"].to_numpy() == 0) if augmented \
        else np.arange(len(meta))
    chosen = originals[shot_indices(len(originals), shots, seed)]
    if not augmented or shots is None:
        return chosen, np.arange(len(meta)) if shots is None else chosen
    return chosen, np.flatnonzero(np.isin(meta["augment_of"].to_numpy(), chosen))


def subset_bank(bank: Bank, rows: np.ndarray) -> Bank:
    """The bank restricted to the sorted ``rows`` (taps read into memory; metadata re-indexed,
    ``augment_of`` pointing at the new rows)."""
    meta = bank.meta.iloc[rows].reset_index(drop=True)
    if "augment_of" in meta.columns:
        meta["augment_of"] = np.searchsorted(rows, meta["augment_of"].to_numpy())
    return Bank({k: np.asarray(v[rows]) for k, v in bank.taps.items()}, meta, bank.fingerprint)


def fit_bank(train: Bank, shots: int | None, seed: int) -> Bank:
    """The train bank a run fits on: all of it, or its few-shot subset (:func:`shot_rows`)."""
    return train if shots is None else subset_bank(train, shot_rows(train.meta, shots, seed)[1])


def holdout_rows(meta: pd.DataFrame, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(rows fitted on, held-out rows) of a train bank for the unsupervised threshold: the
    split (:func:`holdout_split`) draws among the original images; with ``--augment`` an
    image's copies follow it into the fitted part and are left out when it is held out."""
    if "augment_of" not in meta.columns:
        return holdout_split(len(meta), fraction, seed)
    originals = np.flatnonzero(meta["augment"].to_numpy() == 0)
    fit, out = holdout_split(len(originals), fraction, seed)
    return (np.flatnonzero(np.isin(meta["augment_of"].to_numpy(), originals[fit])),
            originals[out])


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
    return int(bank.fingerprint.get("crop") or bank.fingerprint["image_size"])


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
    tag = resolve_tag(banks_dir, backbone, category, bank)
    # Both banks are validated (files, shapes, train/test consistency, finite values) before
    # anything is fitted.
    train, test = load_pair(banks_dir, backbone, tag, category)
    check_finite(test, banks_dir, backbone, tag, category, "test")
    n_images = int((train.meta["augment"] == 0).sum()) if "augment" in train.meta.columns \
        else len(train)
    if shots is not None and not 1 <= int(shots) <= n_images:
        raise PatchbankError(
            f"--shots {shots}: {BankPaths.of(banks_dir, backbone, tag, category, 'train').csv}"
            f" has {n_images} training images; choose 1..{n_images} or leave it out (all)")
    shots = None if shots is None else int(shots)
    name = name or run_name(method, scorer.params, tag, holdout, seed, shots)
    paths = RunPaths.of(scores_dir, backbone, name, category)
    info: dict[str, Any] = {
        "method": method,
        "params": scorer.params,
        "holdout": holdout,
        "seed": seed,
        "shots": shots,
        "banks": {"train": train.fingerprint, "test": test.fingerprint},
        "patchbank_version": __version__,
    }
    # One writer per run folder: a second score (or evaluate) run waits, then finds it done.
    with file_lock(paths.lock, on_wait=lambda: log.info(
            "%s: another score or evaluate run is writing it; waiting", paths.folder)):
        sweep_stale_temporaries(paths.folder)  # left by killed runs
        old = read_run_info(paths)
        status = "computed"
        if old is None and paths.run_json.exists():
            log.warning("%s: unreadable run.json, recomputing", paths.folder)
            status = "recomputed"
        if old is not None:
            diff = _diff({k: old.get(k) for k in RUN_KEYS}, {k: info[k] for k in RUN_KEYS})
            damaged = [] if diff else verify_run(paths, old)
            if not diff and not damaged and not overwrite:
                log.info("%s: up to date, skipped", paths.folder)
                return name, "skipped"
            status = "overwritten" if not diff and not damaged else "recomputed"
            if diff:
                log.warning("%s: configuration changed (%s), recomputing", paths.folder,
                            "; ".join(d[:120] for d in diff))
            elif damaged:
                log.warning("%s: damaged (%s), recomputing", paths.folder, "; ".join(damaged))
        chosen, _ = shot_rows(train.meta, shots, seed)
        info["n_train_bank"] = len(train)
        info["train_indices"] = chosen.tolist() if shots is not None else None
        train = fit_bank(train, shots, seed)
        _fit_score_write(scorer, method, backbone, category, name, tag, train, test, paths,
                         info, holdout, seed, device)
    return name, status


def _fit_score_write(scorer: Any, method: str, backbone: str, category: str, name: str,
                     tag: str, train: Bank, test: Bank, paths: RunPaths, info: dict[str, Any],
                     holdout: float, seed: int, device: str) -> None:
    """Fit, score, hold out, and write the run (``run.json`` last)."""
    t0 = time.perf_counter()
    try:
        scorer.fit(train.taps)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, maps = scorer.score(test.taps)
    except ValueError as err:
        raise PatchbankError(f"--method {method}: {err}") from None
    score_s = time.perf_counter() - t0
    # The old run stops counting as complete before its model is replaced.
    paths.run_json.unlink(missing_ok=True)
    paths.folder.mkdir(parents=True, exist_ok=True)
    model_bytes = scorer.save(paths.model)
    log.info("%s %s/%s: fit %.1f s, score %.1f s", method, backbone, category, fit_s, score_s)

    train_scores, holdout_s, held_maps = None, None, None
    fit_idx, out_idx = holdout_rows(train.meta, holdout, seed)
    info["holdout_applied"] = bool(len(out_idx))
    if holdout > 0 and not len(out_idx):
        log.info("%s/%s: %d training images are too few for a %.0f %% hold-out (needs >= 2 "
                 "held out and >= 2 left); no unsupervised threshold", backbone, category,
                 len(train), 100 * holdout)
    if len(out_idx):
        t0 = time.perf_counter()
        held = make_scorer(method, scorer.params, device=device).fit(
            {k: v[fit_idx] for k, v in train.taps.items()})
        held_scores, held_maps = held.score({k: v[out_idx] for k, v in train.taps.items()})
        train_scores = pd.DataFrame(
            {"path": train.meta["path"].to_numpy()[out_idx], "score": held_scores}
        )
        holdout_s = round(time.perf_counter() - t0, 3)

    meta = test.meta
    table = pd.DataFrame({
        "path": meta["path"], "defect_type": meta["defect_type"], "label": meta["label"],
        "score": np.asarray(scores, dtype=np.float64), "mask_path": meta["mask_path"],
        "height": meta["height"], "width": meta["width"],
    })[SCORE_COLUMNS]
    info.update({
        "backbone": backbone,
        "bank": tag,
        "run": name,
        "category": category,
        "layers": list(scorer.layers_),
        "pixel_level": maps is not None,
        "map_sigma": float(scorer.map_sigma),
        "input_size": input_size(test),
        "crop": test.fingerprint.get("crop"),
        "image_size": test.fingerprint["image_size"],
        "grid": list(maps.shape[1:]) if maps is not None else None,
        "n_train": len(train),
        "n_test": len(test),
        "fit_s": round(fit_s, 3),
        "score_s": round(score_s, 3),
        "holdout_fit_score_s": holdout_s,
        "model": {"file": MODEL_FILE, "bytes": model_bytes},
    })
    if train_scores is not None and held_maps is not None:
        # the unsupervised pixel threshold's inputs, so predict needs no refit for it
        held_meta = train.meta.iloc[out_idx]
        train_scores["map_max"] = map_maxima(held_maps, info, held_meta["height"],
                                             held_meta["width"])
    write_run(paths, table, maps, train_scores, info)
