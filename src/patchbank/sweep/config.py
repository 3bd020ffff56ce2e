"""Typed sweep configuration, read from YAML (``scripts/sweep.py --config``) or built from flags.

YAML keys (all optional but ``backbones``/``methods`` default to Lite0 and padim)::

    name: bottle_fewshot            # -> scores/sweeps/<name>.csv
    data_root: ../shared/data/mvtec_ad   # omit: the embedded demo dataset
    categories: [bottle]            # or "all", or "bottle,screw"
    backbones: [efficientnet_lite0, efficientnet_lite2]
    extract:                        # settings, each crossed with every backbone
      - {weights: auto}             # weights, image_size, layers, crop, normalize
      - {weights: auto, image_size: 256, normalize: imagenet}
    methods:                        # method -> {param: value or list of values (a grid)}
      padim: {}
      knn: {k: [1, 3], metric: cosine}
    shots: [1, 4, 16, all]          # few-shot protocol; "all" = every training image
    seeds: [0, 1, 2]
    holdout: 0.2
    banks_dir: featurebanks
    scores_dir: scores
    device: auto                    # auto | cpu | cuda
    eval_size: null                 # evaluate pixel metrics at this size (null: original)
    figures: false                  # per-category evaluation figures (the sweep's own are drawn)
    batch_size: 16
    executor: inprocess             # inprocess | ray
    ray_address: null               # an existing cluster, e.g. ray://head:10001 or head:6379
    num_cpus: null                  # local Ray only (default: all cores)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from patchbank.core.errors import PatchbankError, SweepError
from patchbank.features.spec import ExtractSpec

EXECUTORS = ("inprocess", "ray")
SETTING_KEYS = ("weights", "image_size", "layers", "crop", "normalize")


@dataclass(frozen=True)
class ExtractSetting:
    """Extraction settings crossed with every backbone (``None``: the registry default)."""

    weights: str = "auto"
    image_size: int | None = None
    layers: tuple[int, ...] | None = None
    crop: int | None = None
    normalize: str | None = None

    def spec(self, backbone: str) -> ExtractSpec:
        """The :class:`ExtractSpec` of this setting for ``backbone``."""
        return ExtractSpec(backbone, self.weights, self.layers, self.image_size, self.crop,
                           self.normalize)

    def columns(self) -> dict[str, Any]:
        """The setting as table columns (layers as ``1.2.3``, defaults empty)."""
        return {"weights": self.weights, "image_size": self.image_size,
                "layers": ".".join(map(str, self.layers)) if self.layers else None,
                "crop": self.crop, "normalize": self.normalize}


@dataclass(frozen=True)
class MethodGrid:
    """One method and its parameter grid: every combination of the listed values."""

    method: str
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def combinations(self) -> list[dict[str, str]]:
        """Every parameter combination (``[{}]`` without a grid)."""
        keys = [k for k, _ in self.grid]
        return [dict(zip(keys, values, strict=True))
                for values in itertools.product(*(v for _, v in self.grid))]


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep expands into jobs (see :mod:`patchbank.sweep.graph`)."""

    name: str = "sweep"
    data_root: Path | None = None
    categories: str = "all"
    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    extract: tuple[ExtractSetting, ...] = (ExtractSetting(),)
    methods: tuple[MethodGrid, ...] = (MethodGrid("padim"),)
    shots: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    holdout: float = 0.2
    banks_dir: Path = Path("featurebanks")
    scores_dir: Path = Path("scores")
    device: str = "auto"
    eval_size: int | None = None
    figures: bool = False
    batch_size: int = 16
    executor: str = "inprocess"
    ray_address: str | None = None
    num_cpus: int | None = None
    source: str = field(default="flags", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SweepError(f"{where}: name {self.name!r} must be a plain file name")
        if self.executor not in EXECUTORS:
            raise SweepError(f"{where}: executor {self.executor!r}: choose "
                             f"{' or '.join(EXECUTORS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SweepError(f"{where}: device {self.device!r}: choose auto, cpu or cuda")
        for label, items in (("backbones", self.backbones), ("methods", self.methods),
                             ("shots", self.shots), ("seeds", self.seeds),
                             ("extract", self.extract)):
            if not items:
                raise SweepError(f"{where}: {label} is empty; give at least one")
        if any(s is not None and s < 1 for s in self.shots):
            raise SweepError(f"{where}: shots {list(self.shots)}: use positive integers or "
                             "'all'")
        if not 0 <= self.holdout < 1:
            raise SweepError(f"{where}: holdout {self.holdout}: use a fraction in [0, 1)")

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON values (recorded beside the sweep's table)."""
        return {
            "name": self.name, "data_root": str(self.data_root) if self.data_root else None,
            "categories": self.categories, "backbones": list(self.backbones),
            "extract": [s.columns() for s in self.extract],
            "methods": {m.method: {k: list(v) for k, v in m.grid} for m in self.methods},
            "shots": ["all" if s is None else s for s in self.shots],
            "seeds": list(self.seeds), "holdout": self.holdout,
            "banks_dir": str(self.banks_dir), "scores_dir": str(self.scores_dir),
            "device": self.device, "eval_size": self.eval_size, "figures": self.figures,
        }


# --------------------------------------------------------------------------- parsing helpers


def parse_list(value: Any, where: str, key: str) -> list[Any]:
    """A YAML list, a scalar, or a comma-separated string -> a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, int | float | bool):
        return [value]
    raise SweepError(f"{where}: {key}: expected a list or a comma-separated string, "
                     f"got {type(value).__name__}")


def parse_shots(values: Sequence[Any], where: str) -> tuple[int | None, ...]:
    """``[1, 4, "all"]`` -> ``(1, 4, None)`` (order kept, duplicates dropped)."""
    out: list[int | None] = []
    for v in values:
        if isinstance(v, str) and v.strip().lower() == "all":
            shot = None
        else:
            try:
                shot = int(v)
            except (TypeError, ValueError):
                raise SweepError(f"{where}: shots {v!r}: use positive integers or 'all'") \
                    from None
        if shot not in out:
            out.append(shot)
    return tuple(out)


def parse_ints(values: Sequence[Any], where: str, key: str) -> tuple[int, ...]:
    """Integers, order kept, duplicates dropped."""
    try:
        return tuple(dict.fromkeys(int(v) for v in values))
    except (TypeError, ValueError):
        raise SweepError(f"{where}: {key} {list(values)}: expected integers") from None


def _scalar(value: Any) -> str:
    """A parameter value as the string form ``--param`` takes (lists become ``1,2,3``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def parse_methods(value: Any, where: str) -> tuple[MethodGrid, ...]:
    """``{"knn": {"k": [1, 3]}}``, ``["padim", "knn"]`` or ``"padim,knn"`` -> method grids.

    A parameter whose value is a list is a grid axis; ``layers: "1,2"`` stays one value (a
    comma string is a value, not an axis, in YAML).
    """
    if isinstance(value, str | list) and not isinstance(value, dict):
        value = {m: {} for m in parse_list(value, where, "methods")}
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: methods: expected a mapping method -> parameters")
    out = []
    for method, grid in value.items():
        grid = grid or {}
        if not isinstance(grid, Mapping):
            raise SweepError(f"{where}: methods.{method}: expected a mapping parameter -> "
                             "value or list of values")
        axes = tuple((str(k), tuple(_scalar(x) for x in (v if isinstance(v, list) else [v])))
                     for k, v in grid.items())
        if any(not vals for _, vals in axes):
            raise SweepError(f"{where}: methods.{method}: an empty list of values")
        out.append(MethodGrid(str(method), axes))
    return tuple(out)


def parse_setting(item: Any, where: str) -> ExtractSetting:
    """One ``extract:`` entry -> :class:`ExtractSetting`."""
    if not isinstance(item, Mapping):
        raise SweepError(f"{where}: extract entries must be mappings, e.g. "
                         "{weights: auto, image_size: 256}")
    unknown = set(item) - set(SETTING_KEYS)
    if unknown:
        raise SweepError(f"{where}: extract: unknown key(s) {sorted(unknown)}; known: "
                         f"{', '.join(SETTING_KEYS)}")
    layers = item.get("layers")
    if layers is not None:
        layers = parse_ints(parse_list(layers, where, "layers"), where, "extract.layers")
    try:
        setting = ExtractSetting(
            weights=str(item.get("weights", "auto")),
            image_size=None if item.get("image_size") is None else int(item["image_size"]),
            layers=layers,
            crop=None if item.get("crop") is None else int(item["crop"]),
            normalize=item.get("normalize"))
        setting.spec("efficientnet_lite0")  # validates sizes and normalisation
    except (TypeError, ValueError) as err:
        raise SweepError(f"{where}: extract {dict(item)}: {err}") from None
    except PatchbankError as err:
        raise SweepError(f"{where}: extract {dict(item)}: {err}") from None
    return setting


def config_from_mapping(data: Mapping[str, Any], source: str) -> SweepConfig:
    """A :class:`SweepConfig` from a parsed YAML mapping; unknown keys are refused."""
    known = {f.name for f in fields(SweepConfig)} - {"source"}
    unknown = set(data) - known
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {sorted(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    kw: dict[str, Any] = {"source": source}
    for key in ("name", "categories", "device", "executor", "ray_address"):
        if data.get(key) is not None:
            kw[key] = str(data[key]) if key != "categories" else \
                ",".join(map(str, parse_list(data[key], source, key)))
    for key in ("data_root", "banks_dir", "scores_dir"):
        if data.get(key) is not None:
            kw[key] = Path(str(data[key])).expanduser()
    if "backbones" in data:
        kw["backbones"] = tuple(str(b) for b in parse_list(data["backbones"], source,
                                                           "backbones"))
    if "extract" in data:
        items = data["extract"] if isinstance(data["extract"], list) else [data["extract"]]
        kw["extract"] = tuple(parse_setting(i, source) for i in items)
    if "methods" in data:
        kw["methods"] = parse_methods(data["methods"], source)
    if "shots" in data:
        kw["shots"] = parse_shots(parse_list(data["shots"], source, "shots"), source)
    if "seeds" in data:
        kw["seeds"] = parse_ints(parse_list(data["seeds"], source, "seeds"), source, "seeds")
    try:
        for key, cast in (("holdout", float), ("eval_size", int), ("batch_size", int),
                          ("num_cpus", int)):
            if data.get(key) is not None:
                kw[key] = cast(data[key])
    except (TypeError, ValueError) as err:
        raise SweepError(f"{source}: {err}") from None
    if data.get("figures") is not None:
        kw["figures"] = bool(data["figures"])
    return SweepConfig(**kw)


def load_config(path: Path) -> SweepConfig:
    """Read a sweep YAML file; a missing or malformed file is one line naming it."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file; check --config") from None
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise SweepError(f"{path}: not valid YAML ({first}); fix the file") from None
    if not isinstance(data, Mapping):
        raise SweepError(f"{path}: expected a mapping of sweep settings (name:, backbones:, "
                         "methods:, ...)")
    # relative paths in the file are taken from the working directory, as for every command
    return config_from_mapping(data, str(path))


def params_json(params: Mapping[str, Any]) -> str:
    """Stable one-line JSON of a parameter dict (a table column)."""
    return json.dumps(dict(params), sort_keys=True, default=str)
