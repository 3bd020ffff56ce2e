"""Score-stage methods on in-memory feature banks (N, h, w, C): registry and factory.

>>> scorer = make_scorer("patchcore", {"coreset": "0.1"}).fit(train_bank)  # doctest: +SKIP
>>> image_scores, maps = scorer.score(test_bank)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

from patchbank.scorers.base import PooledScorer, Scorer
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

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (KNNScorer, PaDiMScorer, PatchCoreScorer, SPADEScorer, MahalanobisScorer,
                OCSVMScorer, IForestScorer, LOFScorer, EllipticScorer, KMeansScorer)
}


def make_scorer(name: str, params: Mapping[str, str | int | float | bool | None] | None = None,
                device: str = "auto") -> Scorer:
    """Build the scorer ``name`` with ``params`` (strings are converted to each default's type).

    Unknown method -> ValueError listing SCORERS; unknown key -> ValueError listing the valid
    keys; a value that does not parse -> ValueError naming the key and the expected type.
    """
    if name not in SCORERS:
        raise ValueError(f"unknown scoring method {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name](device=device, **dict(params or {}))


__all__ = ["SCORERS", "PooledScorer", "Scorer", "make_scorer"]
