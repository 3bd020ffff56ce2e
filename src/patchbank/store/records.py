"""Typed run records: :class:`RunInfo` (a score run's ``run.json``) and :class:`BankFingerprint`
(a feature bank's ``<split>.json``).

Both are dataclasses with a validated ``from_json(dict, where)`` and a ``to_json()`` that
writes the keys and values the files have always held (same key order for ``run.json``, which
the score stage writes unsorted). Files written before a key existed still load: such keys are
optional fields whose default is what the readers assumed before (documented per field), and
a key absent from the file read stays absent when the record is written back, so
``from_json(d).to_json() == d`` for every well-formed ``d``. Keys this patchbank does not know
are kept in ``extra``. A missing required key or a value of the wrong JSON type raises one
line naming the file and the fix (:class:`ScoresError` / :class:`BankError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from patchbank.core.errors import BankError, PatchbankError, ScoresError

_NUM = (int, float)
_NONE = type(None)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance`` for JSON values: a bool is not a number."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
             list: "a list", dict: "an object", _NONE: "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types if not (t is int and float in
                                                                       types)))


class _Record:
    """``from_json`` / ``to_json`` shared by the records: ``TYPES`` gives each field's JSON
    types, ``REQUIRED`` the keys a file must hold."""

    TYPES: ClassVar[dict[str, tuple[type, ...]]]
    REQUIRED: ClassVar[tuple[str, ...]]
    ERROR: ClassVar[type[PatchbankError]]
    FIX: ClassVar[str]

    extra: dict[str, Any]
    _absent: frozenset[str]

    @classmethod
    def problems(cls, data: Any) -> list[str]:
        """What keeps ``data`` from being this record (empty when it is well-formed)."""
        if not isinstance(data, Mapping):
            return ["not a JSON object"]
        return [f"key {k!r} missing or not {_type_names(t)}"
                + (f" (found {data[k]!r})" if k in data else "")
                for k, t in cls.TYPES.items()
                if (k in data and not _type_ok(data[k], t)) or (k not in data and
                                                                k in cls.REQUIRED)]

    @classmethod
    def from_json(cls, data: Any, where: Path | str, fix: str | None = None) -> Self:
        """The record in ``data`` (a parsed JSON object read from ``where``), or one line
        naming ``where``, what is wrong and ``fix`` (default: the record's usual fix)."""
        problems = cls.problems(data)
        if problems:
            raise cls.ERROR(f"{where}: {'; '.join(problems)}; {fix or cls.FIX}")
        known = {k: data[k] for k in cls.TYPES if k in data}
        record = cls(**known)  # type: ignore[arg-type]
        record.extra = {k: v for k, v in data.items() if k not in cls.TYPES}
        record._absent = frozenset(k for k in cls.TYPES if k not in data)
        return record

    def to_json(self) -> dict[str, Any]:
        """The JSON object: every field in declaration order (less those absent from the file
        this record was read from), then ``extra``."""
        absent = getattr(self, "_absent", frozenset())
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore
               if f.name in self.TYPES and f.name not in absent}
        out.update(self.extra)
        return out


@dataclass(eq=False)
class BankFingerprint(_Record):
    """A bank's ``<split>.json``: everything that changes the bank's content (written by the
    extract stage, ``patchbank.stages.extract.fingerprint``).

    The optional fields were added over time; a fingerprint without them reads as None (the
    readers only use ``spec``, ``weights``, ``mean``, ``std`` and ``model_id`` when present).
    """

    format: int
    backbone: str
    category: str
    split: str
    image_size: int
    crop: int | None
    taps: list[dict[str, Any]]
    n_images: int
    layers: list[int]
    tag: str
    patchbank_version: str | None = None
    spec: dict[str, Any] | None = None
    model_id: str | None = None
    weights: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    dtype: str | None = None
    files_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _absent: frozenset[str] = field(default=frozenset(), repr=False)

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "format": (int,), "backbone": (str,), "category": (str,), "split": (str,),
        "image_size": (int,), "crop": (int, _NONE), "taps": (list,), "n_images": (int,),
        "layers": (list,), "tag": (str,), "patchbank_version": (str, _NONE),
        "spec": (dict, _NONE), "model_id": (str, _NONE), "weights": (str, _NONE),
        "mean": (list, _NONE), "std": (list, _NONE), "dtype": (str, _NONE),
        "files_hash": (str, _NONE),
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("format", "backbone", "category", "split",
                                           "image_size", "crop", "taps", "n_images", "layers",
                                           "tag")
    ERROR: ClassVar[type[PatchbankError]] = BankError
    FIX: ClassVar[str] = "re-extract the bank with --overwrite"

    @classmethod
    def problems(cls, data: Any) -> list[str]:
        out = super().problems(data)
        if out:
            return out
        taps = data["taps"]
        if not taps or not all(isinstance(t, dict) and _type_ok(t.get("layer"), (int,))
                               and isinstance(t.get("shape"), list) and len(t["shape"]) == 3
                               for t in taps):
            out.append("taps must be a list of {layer, shape: [h, w, C]}")
        return out


@dataclass(eq=False)
class RunInfo(_Record):
    """A score run's ``run.json`` (written by the score stage, built in memory by the app's
    quick model).

    Only ``method`` is required. Runs scored by older patchbanks lack some keys; they read as:
    ``params`` {} ; ``holdout`` 0.0 (no hold-out); ``seed`` None (unrecorded: those runs
    used the score stage's default seed 0, see :attr:`fit_seed`); ``shots`` None (every
    training image); ``banks`` {} ;
    ``pixel_level`` False; every other field None (unknown). The map keys (``map_sigma``,
    ``input_size``, ``image_size``, ``crop``) of a pixel-level run are checked by
    :func:`patchbank.store.runs.map_info_problems`, which names what is missing.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    holdout: float = 0.0
    seed: int | None = None
    shots: int | None = None
    banks: dict[str, dict[str, Any]] = field(default_factory=dict)
    patchbank_version: str | None = None
    n_train_bank: int | None = None
    train_indices: list[int] | None = None
    holdout_applied: bool | None = None
    backbone: str | None = None
    bank: str | None = None
    run: str | None = None
    category: str | None = None
    layers: list[int] | None = None
    pixel_level: bool = False
    map_sigma: float | None = None
    input_size: int | None = None
    crop: int | None = None
    image_size: int | None = None
    grid: list[int] | None = None
    n_train: int | None = None
    n_test: int | None = None
    fit_s: float | None = None
    score_s: float | None = None
    holdout_fit_score_s: float | None = None
    model: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _absent: frozenset[str] = field(default=frozenset(), repr=False)

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "method": (str,), "params": (dict,), "holdout": _NUM, "seed": (int, _NONE),
        "shots": (int, _NONE), "banks": (dict,), "patchbank_version": (str, _NONE),
        "n_train_bank": (int, _NONE), "train_indices": (list, _NONE),
        "holdout_applied": (bool, _NONE), "backbone": (str, _NONE), "bank": (str, _NONE),
        "run": (str, _NONE), "category": (str, _NONE), "layers": (list, _NONE),
        "pixel_level": (bool,),
        # map geometry: numbers (or anything, reported by map_info_problems when pixel-level)
        "map_sigma": (int, float, str, _NONE), "input_size": (int, float, str, _NONE),
        "crop": (int, float, str, _NONE), "image_size": (int, float, str, _NONE),
        "grid": (list, _NONE), "n_train": (int, _NONE), "n_test": (int, _NONE),
        "fit_s": (int, float, _NONE), "score_s": (int, float, _NONE),
        "holdout_fit_score_s": (int, float, _NONE), "model": (dict, _NONE),
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("method",)
    ERROR: ClassVar[type[PatchbankError]] = ScoresError
    FIX: ClassVar[str] = "re-score with --overwrite"

    @classmethod
    def problems(cls, data: Any) -> list[str]:
        out = super().problems(data)
        if not out and not all(isinstance(v, dict) for v in data.get("banks", {}).values()):
            out.append("banks must map each split to its fingerprint object")
        return out

    @property
    def fit_seed(self) -> int:
        """The seed the run's shots and hold-out were drawn with (0 when unrecorded: runs
        scored before ``seed`` was written used the default, 0)."""
        return 0 if self.seed is None else self.seed

    @property
    def geometry(self) -> dict[str, Any]:
        """The keys that place this run's maps on images (``place_map``'s ``info``)."""
        return {"image_size": self.image_size, "crop": self.crop,
                "input_size": self.input_size, "map_sigma": self.map_sigma}

    @property
    def train_fingerprint(self) -> dict[str, Any] | None:
        """The train bank's fingerprint as recorded (possibly partial), or None."""
        return self.banks.get("train")
