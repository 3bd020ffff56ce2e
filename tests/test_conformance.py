"""The scorer conformance suite: every registered scorer passes ``check_scorer``, and toy
scorers with one defect each fail it, naming the scorer and the check."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from patchbank.scorers import SCORERS, register_scorer
from patchbank.scorers.base import Scorer
from patchbank.scorers.checks import CHECKS, check_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_scorer_conforms(name: str) -> None:
    check_scorer(SCORERS[name])


# ---------------------------------------------------------------- toy scorers


class MeanToy(Scorer):
    """Map = L2 distance of each patch to the mean train patch at its place; score = max."""

    name: ClassVar[str] = "toy_mean"
    pixel_level: ClassVar[bool] = True

    def _fit(self, train: np.ndarray) -> None:
        self._mean = np.asarray(train, dtype=np.float64).mean(axis=0)

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = np.linalg.norm(np.asarray(test, dtype=np.float64) - self._mean, axis=-1)
        return maps.reshape(len(test), -1).max(axis=1), maps

    def _state(self) -> dict[str, np.ndarray]:
        return {"mean": self._mean}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._mean = np.asarray(arrays["mean"], dtype=np.float64)


class MutatesToy(MeanToy):
    name: ClassVar[str] = "toy_mutates"

    def _fit(self, train: np.ndarray) -> None:
        super()._fit(train)
        train -= train.mean(axis=0)  # centres the caller's bank in place


class UnseededToy(MeanToy):
    name: ClassVar[str] = "toy_unseeded"

    def _fit(self, train: np.ndarray) -> None:
        super()._fit(train)
        self._mean = self._mean + np.random.default_rng().normal(size=self._mean.shape)


class ForgetfulToy(MeanToy):
    name: ClassVar[str] = "toy_forgetful"

    def _state(self) -> dict[str, np.ndarray]:
        return {"mean": np.zeros_like(self._mean)}


class NoMapsToy(MeanToy):
    name: ClassVar[str] = "toy_no_maps"

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, None]:
        return super()._score(test)[0], None  # pixel_level is True


class AllLayersToy(MeanToy):
    name: ClassVar[str] = "toy_all_layers"
    tap_policy: ClassVar[str] = "last"

    def choose_layers(self, available: Sequence[int],
                      grids: Sequence[tuple[int, int]] | None = None) -> tuple[int, ...]:
        return tuple(available)  # ignores its tap_policy


class BatchToy(MeanToy):
    name: ClassVar[str] = "toy_batch"

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = super()._score(test)
        return scores - scores.mean(), maps  # relative to the other images scored


class IndexErrorToy(MeanToy):
    name: ClassVar[str] = "toy_index_error"
    multi_tap: ClassVar[bool] = True

    def _fit(self, train: list[np.ndarray]) -> None:
        self._means = [np.asarray(t, dtype=np.float64).mean(axis=0) for t in train]
        self._mean = self._means[0]

    def _score(self, test: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return super()._score(test[0])

    def score(self, test: Any) -> tuple[np.ndarray, np.ndarray]:
        # skips the base class's bank checks
        return self._score([np.asarray(t) for t in test.values()])


@pytest.fixture
def registered() -> Iterator[list[type[Scorer]]]:
    """Registers the classes appended to the list; unregisters them afterwards."""
    classes: list[type[Scorer]] = []
    yield classes
    for cls in classes:
        SCORERS.pop(cls.name, None)


def test_a_conforming_toy_passes(registered: list) -> None:
    registered.append(register_scorer(MeanToy))
    check_scorer(MeanToy)


@pytest.mark.parametrize("cls, check, detail", [
    (MutatesToy, "check_inputs_unchanged", r"fit\(\) with layers='3' changed the train bank's"),
    (UnseededToy, "check_determinism", "the image scores of two seeded fits differ"),
    (ForgetfulToy, "check_save_load", "after save -> load_scorer differ"),
    (NoMapsToy, "check_scores_and_maps", r"pixel_level is True but score\(\) returned no maps"),
    (AllLayersToy, "check_scores_and_maps", r"tap_policy 'last' .* should fit on \(3,\), "
                                            r"fitted on \(1, 2, 3\)"),
    (BatchToy, "check_batch_invariance", "image 0's score alone and in a batch of 3 differ"),
    (IndexErrorToy, "check_score_errors", "expected a clear PatchbankError"),
])
def test_a_defective_toy_fails_the_check_it_breaks(registered: list, cls: type[Scorer],
                                                   check: str, detail: str) -> None:
    registered.append(register_scorer(cls))
    with pytest.raises(AssertionError) as err:
        check_scorer(cls)
    text = str(err.value)
    assert text.startswith(f"check_scorer {cls.name!r} ({cls.__name__}): ")
    failed = [line.split(":")[0].strip() for line in text.splitlines()[1:]]
    assert check in failed, text
    line = next(x for x in text.splitlines() if x.strip().startswith(check + ":"))
    assert re.search(detail, line), line
    assert len(failed) < len(CHECKS)  # the other checks ran and passed


def test_an_unregistered_scorer_fails_and_a_taken_name_is_refused(registered: list) -> None:
    class Stray(MeanToy):
        name: ClassVar[str] = "toy_stray"

    with pytest.raises(AssertionError, match=r"check_declarations: not registered: "
                                             r"SCORERS\['toy_stray'\] is None"):
        check_scorer(Stray)

    class Impostor(MeanToy):
        name: ClassVar[str] = "knn"

    with pytest.raises(ValueError, match="'knn' is taken by KNNScorer"):
        register_scorer(Impostor)
    assert SCORERS["knn"].__name__ == "KNNScorer"


def test_bad_declarations_are_named(registered: list) -> None:
    class Odd(MeanToy):
        name: ClassVar[str] = "toy_odd"
        tap_policy: ClassVar[str] = "middle"
        map_sigma: ClassVar[float] = float("nan")

    registered.append(register_scorer(Odd))
    with pytest.raises(AssertionError, match=r"check_declarations: tap_policy 'middle' is not "
                                             r"one of \['all', 'coarse', 'last'\]"):
        check_scorer(Odd)
    with pytest.raises(AssertionError, match=r"cannot build it with its check_params: "
                                             r"ValueError: toy_odd: unknown parameter"):
        check_scorer(Odd, fast_params={"epochs": 1})
