"""Score-stage methods on in-memory feature banks (N, h, w, C): registry and factory.

>>> scorer = make_scorer("patchcore", {"coreset": "0.1"}).fit(train_bank)  # doctest: +SKIP
>>> image_scores, maps = scorer.score(test_bank)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from patchbank.core.errors import ScoresError, did_you_mean
from patchbank.scorers.anomalydino import AnomalyDINOScorer
from patchbank.scorers.autoencoder import FeatureAEScorer, PixelAEScorer
from patchbank.scorers.base import MODEL_FORMAT, MODEL_VERSION, PooledScorer, Scorer
from patchbank.scorers.classical import (
    EllipticScorer,
    IForestScorer,
    KMeansScorer,
    LOFScorer,
    MahalanobisScorer,
    OCSVMScorer,
)
from patchbank.scorers.knn import KNNScorer
from patchbank.scorers.padim import PaDiMScorer
from patchbank.scorers.patchcore import PatchCoreScorer
from patchbank.scorers.spade import SPADEScorer

#: every scoring method by name (what ``--method`` takes): see :func:`register_scorer`.
SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Add scorer class ``cls`` to :data:`SCORERS` under its ``name`` and return it (usable as
    a class decorator outside this package). A name another class holds -> ValueError."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register_scorer takes a Scorer subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}: set the ClassVar name (the --method it answers to)")
    if SCORERS.get(name, cls) is not cls:
        raise ValueError(f"{cls.__name__}: method name {name!r} is taken by "
                         f"{SCORERS[name].__name__}; choose another name")
    SCORERS[name] = cls
    return cls


# the built-in methods, in the order --help lists them: a new one is one more entry here
for _cls in (KNNScorer, PaDiMScorer, PatchCoreScorer, SPADEScorer, AnomalyDINOScorer,
             MahalanobisScorer, OCSVMScorer, IForestScorer, LOFScorer, EllipticScorer,
             KMeansScorer, FeatureAEScorer, PixelAEScorer):
    register_scorer(_cls)
del _cls


def make_scorer(name: str, params: Mapping[str, str | int | float | bool | None] | None = None,
                device: str = "auto") -> Scorer:
    """Build the scorer ``name`` with ``params`` (strings are converted to each default's type).

    Unknown method -> ValueError listing SCORERS; unknown key -> ValueError listing the valid
    keys; a value that does not parse -> ValueError naming the key and the expected type.
    """
    if name not in SCORERS:
        raise ValueError(f"unknown scoring method {name!r}{did_you_mean(name, SCORERS)}; "
                         f"choose one of {sorted(SCORERS)}")
    return SCORERS[name](device=device, **dict(params or {}))


def methods_help() -> str:
    """One line per method: its parameters with their defaults (and the options of choices)."""
    lines = []
    for name, cls in SCORERS.items():
        parts = []
        for f in dataclasses.fields(cls.Params):
            options = f.metadata.get("choices")
            parts.append(f"{f.name}={f.default}" + (f" ({'|'.join(options)})" if options else ""))
        lines.append(f"  {name}: {', '.join(parts)}")
    return "methods and their parameters (--param key=value):\n" + "\n".join(lines)


def model_header(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a model file written by :meth:`Scorer.save`, the header's
    ``version`` filled in as 1 for models saved before it was recorded; a missing, damaged,
    foreign or newer file raises one-line ScoresError naming it."""
    hint = "re-score the run with --overwrite"
    try:
        with np.load(path, allow_pickle=False) as z:
            meta: Any = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except FileNotFoundError:
        raise ScoresError(f"{path}: no saved model; {hint}") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ScoresError(f"{path}: unreadable model ({str(err).splitlines()[0]}); {hint}") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT or \
            meta.get("method") not in SCORERS:
        raise ScoresError(f"{path}: not a patchbank model of format {MODEL_FORMAT}; {hint}")
    version = meta.setdefault("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or \
            not 1 <= version <= MODEL_VERSION:
        raise ScoresError(f"{path}: model header version {version!r}, this patchbank reads "
                          f"1..{MODEL_VERSION}; upgrade patchbank or {hint}")
    return meta, arrays


def load_scorer(path: Path, device: str = "auto") -> Scorer:
    """A fitted scorer read back from :meth:`Scorer.save` (arrays only, ``allow_pickle=False``);
    a missing, damaged or foreign file raises one-line ScoresError naming it."""
    meta, arrays = model_header(path)
    try:
        params = dict(meta["params"])
        legacy = SCORERS[meta["method"]].legacy_image_score
        if meta["version"] < 3 and legacy and "image_score" not in params:
            params["image_score"] = legacy  # saved before the rule was a parameter
        return make_scorer(meta["method"], params, device).restore(meta, arrays)
    except (KeyError, ValueError, TypeError) as err:
        raise ScoresError(f"{path}: inconsistent model ({err}); re-score the run with "
                          "--overwrite") from None


__all__ = ["SCORERS", "PooledScorer", "Scorer", "load_scorer", "make_scorer", "methods_help",
           "model_header", "register_scorer"]
