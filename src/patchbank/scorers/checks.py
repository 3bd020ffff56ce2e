"""A conformance suite for scorers, after scikit-learn's ``check_estimator``.

:func:`check_scorer` fits a scorer class on small synthetic taps it builds itself (three taps
of 8x8, 4x4 and 2x2 cells, the first strictly finer, as a CNN's stride-4/8/16 layers) and
checks it against what it declares: ``tap_policy`` (which layers it fits on, and so the grid of
its maps), ``pixel_level`` (maps or None), ``map_sigma``, ``min_train``, ``multi_tap``,
``trained`` and ``check_params`` (quick settings for the check, e.g. few epochs). Nothing is
looked up by the scorer's name, so a new scorer passes or fails with no test edits::

    from patchbank.scorers.checks import check_scorer
    check_scorer(MyScorer)  # AssertionError listing every failed check

The checks (:data:`CHECKS`, one function each): declarations, parameters (round trip through
``make_scorer``, JSON and the command line's strings), ``clone()``, errors before fit, shapes
and dtypes of scores and maps, inputs left unchanged, seeded determinism (and, if ``trained``,
a seed that matters), save -> ``load_scorer`` (equal within ``reload_rtol``), scores that do
not depend on the batch, the layers chosen, the aligned taps (unless ``multi_tap``),
``min_train``, and clear errors (PatchbankError, one line) on bad banks at fit and score time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from patchbank.core.errors import PatchbankError
from patchbank.scorers import SCORERS, load_scorer, make_scorer
from patchbank.scorers.base import Params, Scorer, align_taps

#: the synthetic bank: layer -> (h, w, C); the first tap strictly finer than the next.
GRIDS: dict[int, tuple[int, int, int]] = {1: (8, 8, 4), 2: (4, 4, 6), 3: (2, 2, 6)}
#: the layers each ``tap_policy`` chooses from :data:`GRIDS`.
POLICY_LAYERS: dict[str, tuple[int, ...]] = {"coarse": (2, 3), "all": (1, 2, 3), "last": (3,)}
UPSAMPLES = ("bilinear", "nearest")
N_TRAIN, N_TEST = 8, 3
#: scores of one image alone and in a batch may differ by this much (BLAS blocking) relative
#: to the largest score.
BATCH_RTOL = 1e-6


def synthetic_taps(n: int, seed: int) -> dict[int, np.ndarray]:
    """``{layer: (n, h, w, C) float16}`` on :data:`GRIDS`: a fixed pattern per tap plus noise."""
    base = np.random.default_rng(0)
    noise = np.random.default_rng(seed)
    return {layer: (base.normal(size=shape) + 0.3 * noise.normal(size=(n, *shape)))
            .astype(np.float16) for layer, shape in GRIDS.items()}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


def _raises(fn: Callable[[], Any], types: tuple[type[BaseException], ...], what: str) -> str:
    """The one-line message of the error ``fn`` raises, which must be one of ``types``."""
    names = " or ".join(t.__name__ for t in types)
    try:
        fn()
    except types as err:
        text = str(err)
        _require(bool(text.strip()) and "\n" not in text.strip(),
                 f"{what} raised {type(err).__name__} without a one-line message: {text!r}")
        return text
    except Exception as err:  # not one of types: name what was raised instead
        raise AssertionError(f"{what} raised {type(err).__name__} ({_line(err)}); expected a "
                             f"clear {names}") from None
    raise AssertionError(f"{what} raised nothing; expected {names}")


def _same(a: np.ndarray | None, b: np.ndarray | None, what: str, rtol: float = 0.0) -> None:
    """``a`` equals ``b``: exactly (``rtol`` 0), or within ``rtol`` times b's largest value."""
    if a is None or b is None:
        _require(a is None and b is None, f"{what}: one result has maps, the other None")
        return
    _require(np.shape(a) == np.shape(b), f"{what}: shapes {np.shape(a)} and {np.shape(b)}")
    if np.array_equal(a, b):
        return
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    scale = float(np.abs(np.asarray(b, np.float64)).max())
    if rtol > 0 and float(diff.max()) <= rtol * scale:
        return
    raise AssertionError(f"{what} differ (max abs difference {np.nanmax(diff):.3g} over "
                         f"{int((diff > 0).sum())} of {diff.size} values, largest value "
                         f"{scale:.3g}{f', allowed {rtol:g} of it' if rtol else ''})")


@dataclasses.dataclass
class Case:
    """One scorer class under check, with its parameters, device and synthetic banks."""

    cls: type[Scorer]
    params: dict[str, Any]
    device: str = "cpu"
    train: dict[int, np.ndarray] = dataclasses.field(
        default_factory=lambda: synthetic_taps(N_TRAIN, seed=1))
    test: dict[int, np.ndarray] = dataclasses.field(
        default_factory=lambda: synthetic_taps(N_TEST, seed=2))

    def make(self, **extra: Any) -> Scorer:
        return self.cls(device=self.device, **{**self.params, **extra})

    @cached_property
    def fitted(self) -> Scorer:
        scorer = self.make()
        out = scorer.fit(self.train)
        _require(out is scorer, "fit() must return the scorer itself")
        return scorer

    @cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.fitted.score(self.test)


# ---------------------------------------------------------------- the checks


def check_declarations(case: Case) -> None:
    """The ClassVars the pipeline and the other checks rely on are well-formed."""
    cls = case.cls
    name = getattr(cls, "name", None)
    _require(isinstance(name, str) and name.strip() == name and bool(name),
             f"name must be a non-empty string, got {name!r}")
    _require(SCORERS.get(name) is cls, f"not registered: SCORERS[{name!r}] is "
             f"{SCORERS.get(name)!r}; register it (patchbank.scorers.register_scorer)")
    _require(isinstance(cls.Params, type) and issubclass(cls.Params, Params)
             and dataclasses.is_dataclass(cls.Params)
             and cls.Params.__dataclass_params__.frozen,  # type: ignore[attr-defined]
             "Params must be a frozen dataclass subclassing patchbank.scorers.base.Params")
    _require(cls.tap_policy in POLICY_LAYERS,
             f"tap_policy {cls.tap_policy!r} is not one of {sorted(POLICY_LAYERS)}")
    _require(cls.upsample in UPSAMPLES, f"upsample {cls.upsample!r} not one of {UPSAMPLES}")
    _require(isinstance(cls.map_sigma, (int, float)) and not isinstance(cls.map_sigma, bool)
             and math.isfinite(cls.map_sigma) and cls.map_sigma >= 0,
             f"map_sigma must be a finite number >= 0, got {cls.map_sigma!r}")
    for key in ("pixel_level", "multi_tap", "trained"):
        _require(isinstance(getattr(cls, key), bool), f"{key} must be a bool")
    _require(isinstance(cls.reload_rtol, float) and 0 <= cls.reload_rtol < 1e-3,
             f"reload_rtol must be a float in [0, 1e-3), got {cls.reload_rtol!r}")
    _require(isinstance(cls.min_train, int) and cls.min_train >= 1,
             f"min_train must be an int >= 1, got {cls.min_train!r}")
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(cls.check_params) - fields)
    _require(not unknown, f"check_params names unknown parameters {unknown}")
    _require(not cls.trained or "seed" in fields, "a trained scorer needs a 'seed' parameter")


def check_params_round_trip(case: Case) -> None:
    """``make_scorer(name, params).params == params``, also through JSON and as strings."""
    scorer = case.make()
    params = scorer.params
    _require(make_scorer(case.cls.name, params).params == params,
             "make_scorer(name, scorer.params).params != scorer.params")
    _require(json.loads(json.dumps(params)) == params, f"params are not plain JSON: {params}")
    as_text = {k: str(v) for k, v in params.items()}  # what --param key=value passes
    _require(make_scorer(case.cls.name, as_text).params == params,
             f"the parameters' string forms {as_text} do not parse back to {params}")


def check_clone(case: Case) -> None:
    """``clone()`` of a fitted scorer: same class, parameters and device, unfitted."""
    twin = case.fitted.clone()
    _require(type(twin) is case.cls and twin is not case.fitted, "clone() returned another class")
    _require(twin.params == case.fitted.params, "clone() changed the parameters")
    _require(str(twin.device) == str(case.fitted.device), "clone() changed the device")
    _raises(lambda: twin.score(case.test), (RuntimeError, PatchbankError),
            "score() of a clone of a fitted scorer (it must be unfitted)")


def check_unfitted_errors(case: Case) -> None:
    """``score()`` and ``save()`` before ``fit()`` raise a clear error, and write nothing."""
    scorer = case.make()
    text = _raises(lambda: scorer.score(case.test), (RuntimeError, PatchbankError),
                   "score() before fit()")
    _require("fit" in text, f"the error of score() before fit() does not say fit: {text!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        _raises(lambda: scorer.save(path), (RuntimeError, PatchbankError), "save() before fit()")
        _require(not path.exists(), "save() before fit() left a file")


def check_scores_and_maps(case: Case) -> None:
    """Scores (N,) finite float64; maps None iff not pixel_level, else (N, h, w) finite
    float32 on the finest chosen tap's grid; the layers are those of ``tap_policy``."""
    scorer = case.fitted
    want = POLICY_LAYERS[case.cls.tap_policy]
    _require(scorer.layers_ == want, f"tap_policy {case.cls.tap_policy!r} on layers "
             f"{list(GRIDS)} should fit on {want}, fitted on {scorer.layers_}")
    scores, maps = case.reference
    _require(isinstance(scores, np.ndarray) and scores.shape == (N_TEST,)
             and scores.dtype == np.float64, f"image scores must be ({N_TEST},) float64, got "
             f"{getattr(scores, 'shape', None)} {getattr(scores, 'dtype', type(scores))}")
    _require(bool(np.isfinite(scores).all()), f"image scores not all finite: {scores}")
    if not scorer.pixel_level:
        _require(maps is None, "pixel_level is False but score() returned maps")
        return
    grid = GRIDS[want[0]][:2]
    _require(maps is not None, "pixel_level is True but score() returned no maps")
    assert maps is not None
    _require(maps.shape == (N_TEST, *grid) and maps.dtype == np.float32,
             f"maps must be {(N_TEST, *grid)} float32 (the finest chosen tap's grid), got "
             f"{maps.shape} {maps.dtype}")
    _require(bool(np.isfinite(maps).all()), "maps are not all finite")


def check_inputs_unchanged(case: Case) -> None:
    """``fit()`` and ``score()`` leave the arrays they are given unchanged, taps or one array
    (which, unlike several aligned taps, reaches ``_fit`` and ``_score`` uncopied)."""
    for layers in ("auto", "3"):
        train = {k: v.copy() for k, v in case.train.items()}
        test = {k: v.copy() for k, v in case.test.items()}
        case.make(layers=layers).fit(train).score(test)
        for role, given, kept in (("train", train, case.train), ("test", test, case.test)):
            for layer in kept:
                _require(np.array_equal(given[layer], kept[layer]),
                         f"{'fit' if role == 'train' else 'score'}() with layers={layers!r} "
                         f"changed the {role} bank's layer {layer} in place")


def check_determinism(case: Case) -> None:
    """Two fits with the same parameters give identical scores and maps; a trained scorer
    gives others with another seed."""
    scores, maps = case.make().fit(case.train).score(case.test)
    _same(scores, case.reference[0], "the image scores of two seeded fits")
    _same(maps, case.reference[1], "the maps of two seeded fits")
    if case.cls.trained:
        seed = int(case.fitted.params["seed"]) + 1
        other, _ = case.make(seed=seed).fit(case.train).score(case.test)
        _require(not np.array_equal(other, scores),
                 f"trained: seed={seed} gives the same scores as seed={seed - 1}")


def check_save_load(case: Case) -> None:
    """``save()`` then ``load_scorer()``: same class, parameters, layers, scores and maps."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        size = case.fitted.save(path)
        _require(size == path.stat().st_size, f"save() returned {size}, wrote "
                 f"{path.stat().st_size} bytes")
        back = load_scorer(path, device=case.device)
    _require(type(back) is case.cls, f"load_scorer() built a {type(back).__name__}")
    _require(back.params == case.fitted.params, "the loaded scorer's parameters differ")
    _require(back.layers_ == case.fitted.layers_, "the loaded scorer's layers differ")
    scores, maps = back.score(case.test)
    rtol = case.cls.reload_rtol
    _same(scores, case.reference[0], "image scores after save -> load_scorer", rtol)
    _same(maps, case.reference[1], "maps after save -> load_scorer", rtol)


def check_batch_invariance(case: Case) -> None:
    """An image's score and map do not depend on the other images scored with it."""
    for i in range(N_TEST):
        scores, maps = case.fitted.score({k: v[i:i + 1] for k, v in case.test.items()})
        ref_scores, ref_maps = case.reference
        _same(scores, ref_scores[i:i + 1], f"image {i}'s score alone and in a batch of "
              f"{N_TEST}", BATCH_RTOL)
        _same(maps, None if ref_maps is None else ref_maps[i:i + 1],
              f"image {i}'s map alone and in a batch of {N_TEST}", BATCH_RTOL)


def check_layers(case: Case) -> None:
    """Only the chosen layers count; ``layers`` picks them; one 4-D array is one tap."""
    chosen = case.fitted.layers_
    scores, maps = case.fitted.score({k: case.test[k] for k in chosen})
    _same(scores, case.reference[0], f"image scores of a test bank of layers {chosen} only")
    _same(maps, case.reference[1], f"maps of a test bank of layers {chosen} only")
    one = case.make(layers="3").fit(case.train)
    _require(one.layers_ == (3,), f"layers='3' fitted on {one.layers_}")
    scores, maps = one.score(case.test)
    _require(scores.shape == (N_TEST,), f"layers='3': scores of shape {scores.shape}")
    _require(maps is None or maps.shape == (N_TEST, *GRIDS[3][:2]),
             f"layers='3': maps of shape {None if maps is None else maps.shape}, expected "
             f"{(N_TEST, *GRIDS[3][:2])}")
    single = case.make().fit(case.train[3])
    _require(single.layers_ == (0,), f"a single (N, h, w, C) array fitted as {single.layers_}")
    _same(single.score(case.test[3])[0], scores, "scores of layer 3 as one array and as "
          "layers='3'")


def check_aligned_taps(case: Case) -> None:
    """Unless ``multi_tap``, the scorer sees only the aligned taps: fitting on them as one
    array gives the same scores and maps."""
    if case.cls.multi_tap:
        return
    chosen = case.fitted.layers_

    def aligned(bank: Mapping[int, np.ndarray]) -> np.ndarray:
        return align_taps([bank[k] for k in chosen], case.cls.upsample)

    scores, maps = case.make().fit(aligned(case.train)).score(aligned(case.test))
    _same(scores, case.reference[0], f"image scores on taps {chosen} aligned by hand "
          f"({case.cls.upsample!r}; multi_tap is False)")
    _same(maps, case.reference[1], "maps on the taps aligned by hand")


def check_min_train(case: Case) -> None:
    """The scorer fits on ``min_train`` images, and one fewer is a clear error."""
    n = case.cls.min_train
    few = {k: v[:n] for k, v in case.train.items()}
    scores, _ = case.make().fit(few).score(case.test)
    _require(bool(np.isfinite(scores).all()), f"fitted on min_train={n} images, the scores are "
             f"not finite: {scores}")
    if n > 1:
        fewer = {k: v[:n - 1] for k, v in case.train.items()}
        _raises(lambda: case.make().fit(fewer), (PatchbankError,),
                f"fit() on {n - 1} images (min_train={n})")


def check_fit_errors(case: Case) -> None:
    """Bad train banks (not 4-D, NaN, layers of different lengths) are clear errors."""
    train, chosen = case.train, case.fitted.layers_
    bad: dict[str, Any] = {
        "a 3-D train bank": {k: v[..., 0] for k, v in train.items()},
        "a train bank with a NaN": {k: np.where(np.arange(v.size).reshape(v.shape) == 5,
                                                np.nan, v).astype(v.dtype)
                                    for k, v in train.items()},
    }
    if len(chosen) > 1:
        bad["chosen layers of different numbers of images"] = {
            k: v[:-1] if k == chosen[-1] else v for k, v in train.items()}
    for what, bank in bad.items():
        _raises(lambda bank=bank: case.make().fit(bank), (PatchbankError,), f"fit() on {what}")


def check_score_errors(case: Case) -> None:
    """A test bank whose channels, grid or layers differ from the train bank's is a clear
    error (not a numpy traceback), and leaves the fitted scorer as it was."""
    chosen = case.fitted.layers_
    first, last = chosen[0], chosen[-1]
    test = case.test
    bad: dict[str, Any] = {
        f"layer {first} with a channel fewer": {**test, first: test[first][..., :-1]},
        f"layer {first} on a grid a row smaller": {**test, first: test[first][:, :-1]},
        f"no layer {last}": {k: v for k, v in test.items() if k != last},
        "a 3-D test bank": {k: v[..., 0] for k, v in test.items()},
    }
    for what, bank in bad.items():
        _raises(lambda bank=bank: case.fitted.score(bank), (PatchbankError,),
                f"score() of a test bank with {what}")
    scores, maps = case.fitted.score(test)
    _same(scores, case.reference[0], "image scores after the rejected test banks")
    _same(maps, case.reference[1], "maps after the rejected test banks")


CHECKS: tuple[Callable[[Case], None], ...] = (
    check_declarations, check_params_round_trip, check_clone, check_unfitted_errors,
    check_scores_and_maps, check_inputs_unchanged, check_determinism, check_save_load,
    check_batch_invariance, check_layers, check_aligned_taps, check_min_train, check_fit_errors,
    check_score_errors)


def check_scorer(cls: type[Scorer], *, fast_params: Mapping[str, Any] | None = None,
                 device: str = "cpu") -> None:
    """Run every check in :data:`CHECKS` on scorer class ``cls`` (registered in ``SCORERS``),
    with its ``check_params`` updated by ``fast_params``. Raises one AssertionError naming
    the scorer and every failed check."""
    label = f"{getattr(cls, 'name', '?')!r} ({cls.__name__})"
    try:
        case = Case(cls, {**dict(getattr(cls, "check_params", {})), **dict(fast_params or {})},
                    device)
        case.make()
    except Exception as err:  # e.g. an unknown key in check_params
        raise AssertionError(f"check_scorer {label}: cannot build it with its check_params: "
                             f"{type(err).__name__}: {_line(err)}") from None
    failed = []
    for check in CHECKS:
        try:
            check(case)
        except AssertionError as err:
            failed.append(f"{check.__name__}: {err}")
        except Exception as err:  # any crash is a failed check, named
            failed.append(f"{check.__name__}: raised {type(err).__name__}: {_line(err)}")
    if failed:
        raise AssertionError(f"check_scorer {label}: {len(failed)} of {len(CHECKS)} checks "
                             "failed:\n  " + "\n  ".join(failed))
