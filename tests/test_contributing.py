"""The README's CONTRIBUTING recipes, followed step by step as a newcomer would."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import TOY_TAG, write_toy_banks

from patchbank.scorers import SCORERS, load_scorer, make_scorer, methods_help, register_scorer
from patchbank.scorers.base import Params, Scorer, choice
from patchbank.scorers.checks import check_scorer
from patchbank.stages.score import score_category
from patchbank.store.banks import load_bank
from patchbank.store.runs import RunPaths, load_run


# step 1: the class, its parameters and the four methods
class MeanDistanceScorer(Scorer):
    """Map = L2 distance of each patch to the mean training patch at its place; image score =
    the map's max (or mean)."""

    name: ClassVar[str] = "mean_distance"

    @dataclass(frozen=True)
    class Params(Params):
        reduce: str = choice("max", ("max", "mean"))
        eps: float = 0.0

        def check(self) -> None:
            self.require(self.eps >= 0, "eps", ">= 0")

    # step 2: what it is
    pixel_level: ClassVar[bool] = True
    map_sigma: ClassVar[float] = 4.0
    tap_policy: ClassVar[str] = "coarse"

    def _fit(self, train: np.ndarray) -> None:
        self._set_state({"mean": np.asarray(train, dtype=np.float64).mean(axis=0)})

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        diff = np.asarray(test, dtype=np.float64) - self._mean
        maps = np.sqrt((diff ** 2).sum(axis=-1) + self.p.eps)
        flat = maps.reshape(len(maps), -1)
        return (flat.max(axis=1) if self.p.reduce == "max" else flat.mean(axis=1)), maps

    def _state(self) -> dict[str, np.ndarray]:
        return {"mean": self._mean}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._mean = np.asarray(arrays["mean"], dtype=np.float64)


def test_add_a_scorer(tmp_path: Path) -> None:
    assert "mean_distance" not in SCORERS
    register_scorer(MeanDistanceScorer)  # step 3 (in the package: one entry in the tuple)
    try:
        check_scorer(MeanDistanceScorer)  # step 4: what tests/test_conformance.py runs
        with pytest.raises(ValueError, match="'eps' must be >= 0"):
            make_scorer("mean_distance", {"eps": "-1"})
        assert "mean_distance: layers=auto, reduce=max (max|mean), eps=0.0" in methods_help()
        # step 5: the score stage runs it like any built-in method
        banks, scores = tmp_path / "banks", tmp_path / "scores"
        write_toy_banks(banks)
        name, status = score_category(banks, scores, "toy", "mean_distance", "widget",
                                      {"reduce": "mean"}, device="cpu")
        assert status == "computed" and name.startswith("mean_distance-" + TOY_TAG[:12])
        paths = RunPaths.of(scores, "toy", name, "widget")
        run = load_run(paths)
        assert run.info["method"] == "mean_distance" and run.info["map_sigma"] == 4.0
        assert run.info["params"] == {"layers": "auto", "reduce": "mean", "eps": 0.0}
        # the numbers, by hand from the banks
        train = load_bank(banks, "toy", TOY_TAG, "widget", "train").taps[0]
        test = load_bank(banks, "toy", TOY_TAG, "widget", "test").taps[0]
        want = np.linalg.norm(test.astype(np.float64) - train.astype(np.float64).mean(0), axis=-1)
        np.testing.assert_allclose(run.maps, want, rtol=1e-6)
        np.testing.assert_allclose(run.scores["score"], want.reshape(12, -1).mean(1), rtol=1e-9)
        good, bad = run.scores["score"][:6], run.scores["score"][6:]
        assert bad.min() > good.max()  # the toy banks' shifted blocks are found
        assert len(run.train_scores) == 6  # the hold-out: 20 % of 30
        back = load_scorer(paths.model, device="cpu")
        assert type(back) is MeanDistanceScorer and back.params["reduce"] == "mean"
        np.testing.assert_array_equal(back.score({0: test})[1], run.maps)
    finally:
        SCORERS.pop("mean_distance", None)  # unregister: other tests see the built-ins only
    with pytest.raises(ValueError, match="unknown scoring method 'mean_distance'"):
        make_scorer("mean_distance")
