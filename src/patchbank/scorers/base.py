"""The scorer interface, parameter parsing, bank checks and small helpers shared by all methods.

A *bank* is a numpy array (N, h, w, C), float16 or float32: N images, an h x w grid of C-dim
patch embeddings. Scorers work on banks in memory only (no images, no backbone).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from patchbank.core.device import resolve_device as _resolve_device
from patchbank.core.errors import BankError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

_NONE_WORDS = frozenset({"none", "null", ""})
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_MISSING = object()
_TYPE_NAMES = {type(None): "None", bool: "bool", int: "int", float: "float", str: "str"}


def resolve_device(device: str) -> str:
    """``core.device.resolve_device`` as a string (what faiss and torch calls take)."""
    return str(_resolve_device(device))


def coerce_param(method: str, key: str, value: Any, types: tuple[type, ...],
                 choices: tuple[str, ...] | None = None) -> Any:
    """Convert ``value`` (a string from the command line, or a Python value) to one of ``types``.

    Strings are parsed ("none" -> None, "true"/"false" -> bool, "3" -> int, "0.1" -> float);
    an int is accepted for a float parameter and an integral float for an int one.
    Raises ValueError naming the key and the expected type(s).
    """
    expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
    err = ValueError(f"{method}: parameter {key!r} expects {expected}, got {value!r}")
    out: Any = _MISSING
    if isinstance(value, str) and str not in types:
        word = value.strip().lower()
        if type(None) in types and word in _NONE_WORDS:
            out = None
        elif bool in types and word in _TRUE_WORDS | _FALSE_WORDS:
            out = word in _TRUE_WORDS
        else:
            for t in (int, float):
                if t in types:
                    try:
                        out = t(word)
                        break
                    except ValueError:
                        continue
    elif value is None:
        if type(None) in types:
            out = None
    elif isinstance(value, bool):
        if bool in types:
            out = value
    elif isinstance(value, (int, np.integer)):
        if int in types:
            out = int(value)
        elif float in types:
            out = float(value)
    elif isinstance(value, (float, np.floating)):
        if float in types:
            out = float(value)
        elif int in types and float(value).is_integer():
            out = int(value)
    elif isinstance(value, str):
        out = value
    if out is _MISSING:
        raise err
    if isinstance(out, float) and not math.isfinite(out):
        raise err
    if choices is not None and isinstance(out, str) and out not in choices:
        raise ValueError(f"{method}: parameter {key!r} must be one of {list(choices)}, "
                         f"got {value!r}")
    return out



def check_bank(bank: Any, role: str, grid: tuple[int, int, int] | None = None) -> np.ndarray:
    """Return ``bank`` as an (N, h, w, C) float array, or raise BankError saying what is wrong.

    ``grid`` (h, w, C) is the train bank's, which a test bank must match.
    """
    arr = np.asarray(bank) if not isinstance(bank, np.ndarray) else bank
    if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
        raise BankError(f"{role} bank has shape {arr.shape} and dtype {arr.dtype}; expected a "
                        "float (N, h, w, C) array of patch features: rebuild it with extract")
    if arr.shape[0] == 0 or min(arr.shape[1:]) == 0:
        raise BankError(f"{role} bank is empty (shape {arr.shape}): rebuild it with extract")
    if grid is not None and tuple(arr.shape[1:]) != tuple(grid):
        raise BankError(f"{role} bank grid (h, w, C) = {tuple(arr.shape[1:])} differs from the "
                        f"train bank's {tuple(grid)}: extract both splits with the same "
                        "backbone, layers and image size")
    for lo, hi in batches(len(arr), max(1, (1 << 24) // max(1, arr[0].size))):
        if not np.isfinite(arr[lo:hi]).all():
            raise BankError(f"{role} bank has NaN/inf features (images {lo}..{hi - 1}): "
                            "re-extract it (float16 overflow? extract in float32)")
    return arr


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` ranges covering ``range(n)`` in steps of ``size``."""
    size = max(1, int(size))
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def pooled(bank: np.ndarray) -> np.ndarray:
    """Global average over the grid: (N, h, w, C) -> (N, C) float64 (summed in float64)."""
    out = np.empty((bank.shape[0], bank.shape[-1]), dtype=np.float64)
    step = max(1, (1 << 24) // max(1, bank[0].size))
    for lo, hi in batches(len(bank), step):
        out[lo:hi] = bank[lo:hi].mean(axis=(1, 2), dtype=np.float64)
    return out


class Scorer(ABC):
    """One anomaly-scoring method: ``fit`` on a train bank, ``score`` a test bank.

    Subclasses set ``name``, ``defaults`` (every parameter with its default; the default's type
    is the parameter's type unless ``param_types`` says otherwise, e.g. for None defaults),
    ``choices`` for string parameters, ``pixel_level`` and ``map_sigma``, and implement
    ``_fit`` / ``_score``.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    param_types: ClassVar[dict[str, tuple[type, ...]]] = {}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Gaussian sigma in model-input pixels the evaluate stage applies after upsampling maps.
    map_sigma: ClassVar[float] = 0.0
    pixel_level: ClassVar[bool] = False
    #: fewest training images the method can fit on.
    min_train: ClassVar[int] = 1

    def __init__(self, *, device: str = "auto", **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; "
                             f"valid keys: {sorted(self.defaults)}")
        resolved = dict(self.defaults)
        for key, value in params.items():
            types = self.param_types.get(key, (type(self.defaults[key]),))
            resolved[key] = coerce_param(self.name, key, value, types, self.choices.get(key))
        self.params: dict[str, Any] = resolved
        self.device = resolve_device(device)
        self._grid: tuple[int, int, int] | None = None
        self._check_params()

    def _check_params(self) -> None:
        """Range checks on ``self.params``; raise ValueError naming the key (none by default)."""
        return None

    def _require(self, ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{self.name}: parameter {key!r} must be {what}, "
                             f"got {self.params[key]!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def fit(self, train: np.ndarray) -> Self:
        """Fit on a train bank (N, h, w, C); returns self."""
        train = check_bank(train, "train")
        if len(train) < self.min_train:
            raise BankError(f"{self.name} needs at least {self.min_train} training images, the "
                            f"train bank has {len(train)}: add good training images")
        log.info("%s: fitting on %d images, grid %s", self.name, len(train), train.shape[1:])
        self._fit(train)
        self._grid = tuple(int(s) for s in train.shape[1:])  # type: ignore[assignment]
        return self

    def score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores (N,) float64 (higher = more anomalous), maps (N, h, w) float32 or None."""
        if self._grid is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        test = check_bank(test, "test", self._grid)
        log.info("%s: scoring %d images", self.name, len(test))
        scores, maps = self._score(test)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(test))
        if maps is not None:
            maps = np.asarray(maps, dtype=np.float32).reshape(test.shape[:3])
        return scores, maps

    @abstractmethod
    def _fit(self, train: np.ndarray) -> None:
        """Fit on a checked train bank."""

    @abstractmethod
    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Score a checked test bank with the train bank's grid."""


class PooledScorer(Scorer):
    """Image-level methods on globally average-pooled features (N, C); no maps."""

    pixel_level: ClassVar[bool] = False

    def _fit(self, train: np.ndarray) -> None:
        self._fit_pooled(pooled(train))

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, None]:
        return self._score_pooled(pooled(test)), None

    @abstractmethod
    def _fit_pooled(self, z: np.ndarray) -> None:
        """Fit on pooled train features (N, C) float64."""

    @abstractmethod
    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        """Scores (N,) for pooled test features, higher = more anomalous."""
