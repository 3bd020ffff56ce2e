"""The scorer interface, parameter parsing, bank checks and small helpers shared by all methods.

A scorer reads *taps*: the backbone's tapped layers, each an array (N, h_i, w_i, C_i) at its own
resolution (finest first), given as ``{layer: array}`` (a loaded bank's ``taps``), a list, or a
single (N, h, w, C) array. Each method picks the taps its paper uses (parameter ``layers``,
"auto" by default) and combines them as its paper does; most align them to the finest chosen
grid and concatenate channels (:func:`align_taps`). Scorers work on arrays only (no images, no
backbone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from patchbank.core.atomic import atomic_open
from patchbank.core.device import resolve_device as _resolve_device
from patchbank.core.errors import BankError
from patchbank.scorers.image_score import smoothed_max

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


def choice(default: str, options: Sequence[str]) -> Any:
    """A string parameter field restricted to ``options``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(options)})


def _types_of(hint: Any) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); a plain type -> (type,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


@dataclasses.dataclass(frozen=True)
class Params:
    """A scorer's parameters: one typed field per parameter, with its default (the method's
    reference setting). String fields made with :func:`choice` are restricted to their options;
    :meth:`check` holds the range checks. Every scorer takes ``layers``: "auto" (the method's
    ``tap_policy``) or a comma list of the bank's layers. The canonical JSON of
    :meth:`as_dict` names the configuration (run hashes, run.json, model.npz).
    """

    layers: str = "auto"
    #: old parameter name -> (its new name, old value -> new value): read in :meth:`parse`, so
    #: commands, run.json files and model headers written before a rename keep working.
    renamed: ClassVar[Mapping[str, tuple[str, Mapping[str, str]]]] = types.MappingProxyType({})

    @classmethod
    def parse(cls, method: str, values: Mapping[str, Any] | None = None) -> Self:
        """Parameters from ``values`` (strings from the command line, or Python values), each
        converted to its field's type. Unknown key, a value that does not parse or is out of
        range -> ValueError naming the method and the key."""
        values = dict(values or {})
        for old, (new, mapping) in cls.renamed.items():
            if old in values and new not in values:
                value = values.pop(old)
                values[new] = mapping.get(str(value).strip().lower(), value)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{method}: unknown parameter(s) {unknown}; "
                             f"valid keys: {sorted(fields)}")
        if isinstance(values.get("layers"), (list, tuple)):
            values["layers"] = ",".join(str(int(x)) for x in values["layers"])
        hints = typing.get_type_hints(cls)
        kw = {key: coerce_param(method, key, value, _types_of(hints[key]),
                                fields[key].metadata.get("choices"))
              for key, value in values.items()}
        params = cls(**kw)
        try:
            params.check()
        except ValueError as err:
            raise ValueError(f"{method}: {err}") from None
        return params

    def check(self) -> None:
        """Range checks; raise ValueError via :meth:`require` (none by default)."""

    def require(self, ok: bool, key: str, what: str) -> None:
        """ValueError "parameter KEY must be WHAT, got VALUE" unless ``ok``."""
        if not ok:
            raise ValueError(f"parameter {key!r} must be {what}, got {getattr(self, key)!r}")

    def as_dict(self) -> dict[str, Any]:
        """Every parameter by name (JSON types)."""
        return dataclasses.asdict(self)


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


Taps = Mapping[int, np.ndarray] | Sequence[np.ndarray] | np.ndarray
#: version of the fitted-model file written by :meth:`Scorer.save`.
MODEL_FORMAT = 1
#: revision of the model header within MODEL_FORMAT (``"version"``; headers without it, written
#: before it existed, are version 1). 2: the header records its version. 3: the header records
#: ``input_size`` and the params their ``image_score`` rule (older headers: the method's
#: ``legacy_image_score``).
MODEL_VERSION = 3
#: input bytes per batch of images when aligning taps.
ALIGN_BYTES = 64 << 20


def as_taps(features: Any) -> dict[int, np.ndarray]:
    """``{layer: (N, h, w, C)}`` from a dict, a list of taps, a single 4-D array or a bank."""
    features = getattr(features, "taps", features)
    if isinstance(features, Mapping):
        return dict(features)
    if isinstance(features, np.ndarray) and features.ndim == 4:
        return {0: features}
    if isinstance(features, (list, tuple)) and features:
        return dict(enumerate(features))
    arr = np.asarray(features)
    raise BankError(f"bank has shape {arr.shape} and dtype {arr.dtype}; expected (N, h, w, C) "
                    "float arrays of patch features: rebuild it with extract")


def align_taps(taps: Sequence[np.ndarray], mode: str = "bilinear") -> np.ndarray:
    """Taps resized to the first one's grid and concatenated: (N, h0, w0, sum C) float16.

    ``mode`` "bilinear" (align_corners=False, as PatchCore and SPADE) or "nearest" (PaDiM's
    replication of coarse cells). A single tap is returned as it is (no copy).
    """
    if len(taps) == 1:
        return taps[0]
    n, h, w, _ = taps[0].shape
    channels = sum(t.shape[-1] for t in taps)
    out = np.empty((n, h, w, channels), dtype=np.float16)
    step = max(1, ALIGN_BYTES // (4 * h * w * channels))
    kw = {"align_corners": False} if mode == "bilinear" else {}
    for lo, hi in batches(n, step):
        parts = []
        for t in taps:
            x = torch.from_numpy(np.asarray(t[lo:hi], dtype=np.float32)).permute(0, 3, 1, 2)
            if x.shape[-2:] != (h, w):
                x = F.interpolate(x, size=(h, w), mode=mode, **kw)
            parts.append(x)
        out[lo:hi] = torch.cat(parts, dim=1).permute(0, 2, 3, 1).numpy()
    return out


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

    Subclasses set ``name``, ``Params`` (a frozen :class:`Params` dataclass: every parameter,
    typed, with its default), ``pixel_level`` and ``map_sigma``, and implement ``_fit`` /
    ``_score``. Taps are aligned with ``upsample`` unless ``multi_tap`` (then ``_fit`` /
    ``_score`` receive the list of chosen taps). ``patchbank.scorers.checks.check_scorer``
    checks a subclass against these declarations.
    """

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    #: Gaussian sigma in model-input pixels the evaluate stage applies after upsampling maps.
    map_sigma: ClassVar[float] = 0.0
    pixel_level: ClassVar[bool] = False
    #: fewest training images the method can fit on.
    min_train: ClassVar[int] = 1
    #: "coarse": with 3+ taps of different grids, all but the finest (the stride-8/16 taps of
    #: PatchCore); "all": every tap (PaDiM's stride-4/8/16); "last": the deepest tap only.
    tap_policy: ClassVar[str] = "coarse"
    upsample: ClassVar[str] = "bilinear"
    multi_tap: ClassVar[bool] = False
    #: a trained network (seeded by the ``seed`` parameter): slow to fit, its results depend on
    #: the seed.
    trained: ClassVar[bool] = False
    #: parameters that make a fit on a few tiny images quick (e.g. few epochs), used by
    #: ``check_scorer`` and tests; empty for methods that are quick anyway.
    check_params: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})
    #: relative difference allowed between scores (and maps) before and after save ->
    #: ``load_scorer``, times the largest one: 0.0 = identical.
    reload_rtol: ClassVar[float] = 0.0
    #: the image-score rule of runs saved before ``image_score`` was a parameter, when it
    #: differs from today's default (PaDiM: "max_grid"); None = the default.
    legacy_image_score: ClassVar[str | None] = None

    def __init__(self, *, device: str = "auto", input_size: int | None = None,
                 **params: Any) -> None:
        self.p = self.Params.parse(self.name, params)
        self.device = resolve_device(device)
        #: side of the square model input the maps cover (``max_map`` upsamples to it).
        self.input_size = None if input_size is None else int(input_size)
        self._shapes: list[tuple[int, ...]] | None = None
        self.layers_: tuple[int, ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        """The parameters as a dict (what run.json and model.npz record)."""
        return self.p.as_dict()

    def clone(self) -> Self:
        """A new, unfitted scorer of the same class, parameters and device."""
        return type(self)(device=str(self.device), input_size=self.input_size, **self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def choose_layers(self, available: Sequence[int],
                      grids: Sequence[tuple[int, int]] | None = None) -> tuple[int, ...]:
        """The bank layers this scorer uses: its ``tap_policy`` or the ``layers`` parameter.

        "coarse" drops the first tap only when there are 3+ taps and it is strictly finer than
        the next one (a CNN's stride-4 tap); taps of one grid (ViT blocks) are all kept.
        """
        value = self.p.layers.strip().lower()
        if value == "auto":
            if self.tap_policy == "last":
                return (available[-1],)
            finer = grids is None or (len(grids) > 1 and grids[0][0] > grids[1][0])
            if self.tap_policy == "coarse" and len(available) >= 3 and finer:
                return tuple(available[1:])
            return tuple(available)
        try:
            wanted = tuple(sorted({int(x) for x in value.split(",") if x.strip()}))
        except ValueError:
            raise ValueError(f"{self.name}: parameter 'layers' must be 'auto' or a comma list of "
                             f"layers, got {self.p.layers!r}") from None
        missing = [x for x in wanted if x not in available]
        if not wanted or missing:
            raise BankError(f"{self.name}: layers {list(wanted)} asked for, the bank holds "
                            f"{list(available)}: pass --param layers= a subset of them, or "
                            "re-extract with --layers")
        return wanted

    def _taps(self, features: Taps, role: str) -> list[np.ndarray]:
        """The chosen taps of ``features``, checked (shapes must match the train bank's)."""
        taps = as_taps(features)
        if role == "train":
            grids = [tuple(np.shape(t)[1:3]) for t in taps.values()]
            self.layers_ = self.choose_layers(tuple(taps), grids)
        missing = [x for x in self.layers_ if x not in taps]
        if missing:
            raise BankError(f"{role} bank lacks layers {missing} the scorer was fitted on: "
                            "extract both splits with the same settings")
        out = []
        for i, layer in enumerate(self.layers_):
            shape = self._shapes[i] if self._shapes is not None and role != "train" else None
            out.append(check_bank(taps[layer], role, shape))
        if len({len(t) for t in out}) != 1:
            raise BankError(f"{role} bank's layers hold different numbers of images: re-extract")
        return out

    def fit(self, train: Taps) -> Self:
        """Fit on a train bank (its taps, or one (N, h, w, C) array); returns self."""
        taps = self._taps(train, "train")
        n = len(taps[0])
        if n < self.min_train:
            raise BankError(f"{self.name} needs at least {self.min_train} training images, the "
                            f"train bank has {n}: add good training images")
        shapes = [tuple(int(s) for s in t.shape[1:]) for t in taps]
        log.info("%s: fitting on %d images, layers %s %s", self.name, n, self.layers_, shapes)
        self._fit(taps if self.multi_tap else align_taps(taps, self.upsample))
        self._shapes = shapes
        return self

    def score(self, test: Taps) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores (N,) float64 (higher = more anomalous), maps (N, h, w) float32 or None
        on the finest chosen tap's grid."""
        if self._shapes is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        taps = self._taps(test, "test")
        n, (h, w) = len(taps[0]), self._shapes[0][:2]
        log.info("%s: scoring %d images", self.name, n)
        scores, maps = self._score(taps if self.multi_tap else align_taps(taps, self.upsample))
        scores = np.asarray(scores, dtype=np.float64).reshape(n)
        if maps is not None:
            maps = np.asarray(maps, dtype=np.float32).reshape(n, h, w)
            if getattr(self.p, "image_score", None) == "max_map":
                scores = smoothed_max(maps, self.input_size, self.map_sigma)
        return scores, maps

    def save(self, path: Path) -> int:
        """Write the fitted state to ``path`` (an ``.npz`` of plain arrays plus a JSON header;
        no pickle), through a temporary file and a rename. Returns the bytes written."""
        if self._shapes is None:
            raise RuntimeError(f"{self.name}: call fit() before save()")
        meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "method": self.name,
                "params": self.params, "input_size": self.input_size,
                "layers": list(self.layers_), "shapes": [list(s) for s in self._shapes]}
        arrays = {k: np.asarray(v) for k, v in self._state().items()}
        header = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_open(path) as f:
            np.savez(f, __meta__=header, **arrays)
        return Path(path).stat().st_size

    def restore(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Self:
        """Set the fitted state read back from :meth:`save` (see ``scorers.load_scorer``)."""
        self.layers_ = tuple(int(x) for x in meta["layers"])
        if meta.get("input_size") is not None:
            self.input_size = int(meta["input_size"])
        self._shapes = [tuple(int(v) for v in s) for s in meta["shapes"]]
        self._set_state(arrays)
        return self

    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]:
        """Arrays that fully determine the fitted model."""

    @abstractmethod
    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Rebuild the fitted model from :meth:`_state`'s arrays."""

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
        self._z = pooled(train)
        self._fit_pooled(self._z)

    def _state(self) -> dict[str, np.ndarray]:
        # The estimators are seeded functions of the pooled train features: saving those
        # (a few hundred x C floats) and refitting on load rebuilds the same model, no pickle.
        return {"pooled_train": self._z}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._z = np.asarray(arrays["pooled_train"], dtype=np.float64)
        self._fit_pooled(self._z)

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, None]:
        return self._score_pooled(pooled(test)), None

    @abstractmethod
    def _fit_pooled(self, z: np.ndarray) -> None:
        """Fit on pooled train features (N, C) float64."""

    @abstractmethod
    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        """Scores (N,) for pooled test features, higher = more anomalous."""
