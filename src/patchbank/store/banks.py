"""Feature-bank file format (version 2): the contract between the extract and score stages.

Every extraction configuration keeps its own folder, named by its spec's tag (a short readable
part plus a hash of the spec, see :class:`patchbank.features.spec.ExtractSpec`):
``<banks_dir>/<backbone>/<tag>/<category>/``, holding for each split (``train``, ``test``):

- ``<split>.layer<L>.npy`` — one per tapped layer L: (N, h_L, w_L, C_L) float16, each layer at
  its **own** resolution (what the backbone produced; scorers combine taps as their papers do);
  plain ``.npy``, so scorers memory-map them instead of loading the dataset into memory;
- ``<split>.csv`` — one row per image in the same order, columns :data:`META_COLUMNS`;
- ``<split>.json`` — the fingerprint: everything that changes the bank's content, including
  ``taps``: ``[{"layer": L, "shape": [h, w, C]}, ...]`` finest first.

The JSON is written last, so a bank is complete exactly when its JSON parses and every file it
names exists with the shapes it states; each file is written under a temporary name and renamed.
Version-1 banks (one upsampled ``<split>.npz`` in ``<backbone>/<category>/``) are reported as
stale and never read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank.core.atomic import AtomicFile, name_error, preallocate, sweep_stale_temporaries
from patchbank.core.errors import BankError
from patchbank.store.records import BankFingerprint

log = logging.getLogger(__name__)

BANK_FORMAT = 2
SPLITS = ("train", "test")
META_COLUMNS = ["path", "category", "split", "defect_type", "label", "mask_path", "height", "width"]
#: Columns an augmented train bank adds after META_COLUMNS (patchbank.features.augment).
OPTIONAL_COLUMNS = ["augment", "augment_of"]


def meta_columns_ok(columns: Sequence[str]) -> bool:
    """Whether a bank CSV has the bank columns (plus, for augmented banks, OPTIONAL_COLUMNS)."""
    return list(columns) in (META_COLUMNS, META_COLUMNS + OPTIONAL_COLUMNS)


#: Fingerprint keys that differ between the train and test bank of one configuration.
PER_SPLIT_KEYS = ("split", "files_hash", "n_images")


@dataclass
class Bank:
    """A loaded bank: tapped layers (memory-mapped), per-image metadata, the fingerprint."""

    taps: dict[int, np.ndarray]  # layer -> (N, h, w, C) float16, finest first
    meta: pd.DataFrame
    fingerprint: dict[str, Any]

    @property
    def record(self) -> BankFingerprint:
        """The fingerprint as a validated :class:`BankFingerprint`."""
        return BankFingerprint.from_json(self.fingerprint, f"bank {self.fingerprint.get('tag')}"
                                         f" ({self.fingerprint.get('split')})")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.taps)

    @property
    def grid(self) -> tuple[int, int]:
        """The finest tap's (h, w): the grid of maps from methods that align to it."""
        first = next(iter(self.taps.values()))
        return int(first.shape[1]), int(first.shape[2])

    def __len__(self) -> int:
        return len(self.meta)


def bank_folder(banks_dir: Path, backbone: str, tag: str, category: str) -> Path:
    return Path(banks_dir) / backbone / tag / category


@dataclass(frozen=True)
class BankPaths:
    """The files of one bank (one split of one configuration and category)."""

    folder: Path
    split: str

    @classmethod
    def of(cls, banks_dir: Path, backbone: str, tag: str, category: str, split: str) -> BankPaths:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return cls(bank_folder(banks_dir, backbone, tag, category), split)

    @property
    def csv(self) -> Path:
        return self.folder / f"{self.split}.csv"

    @property
    def json(self) -> Path:
        return self.folder / f"{self.split}.json"

    def tap(self, layer: int) -> Path:
        return self.folder / f"{self.split}.layer{int(layer)}.npy"

    @property
    def lock(self) -> Path:
        """Lock file serialising writers of this bank (:func:`patchbank.core.atomic.file_lock`):
        ``<banks_dir>/.locks/<backbone>/<tag>/<category>.<split>.lock``, outside the bank
        folders so they hold bank files only."""
        *_, backbone, tag, category = self.folder.parts
        return self.folder.parents[2] / ".locks" / backbone / tag / f"{category}.{self.split}.lock"

    def describe(self) -> str:
        return str(self.folder / f"{self.split}.*")


def _data_root_of(folder: Path, category: str) -> str | None:
    """The dataset root a bank was built from, read from the first image path of its CSVs."""
    for split in SPLITS:
        try:
            with (folder / f"{split}.csv").open(newline="") as f:
                rows = csv.reader(f)
                header = next(rows)
                first = Path(next(rows)[header.index("path")])
        except (OSError, StopIteration, ValueError, IndexError, csv.Error):
            continue
        # <root>/<category>/<split>/<defect_type>/<file>
        if len(first.parts) >= 5 and first.parts[-4] == category:
            return str(first.parents[3])
    return None


def extract_command(banks_dir: Path, backbone: str, tag: str, category: str) -> str:
    """The extract command that rebuilds this bank: the same settings (from either split's
    fingerprint when one parses), the dataset it was built from (from its CSVs) and the banks
    folder; ``--data-root DATA_ROOT`` when that cannot be read back."""
    folder = bank_folder(banks_dir, backbone, tag, category)
    spec: dict[str, Any] = {}
    for split in SPLITS:
        fp = read_fingerprint(BankPaths(folder, split))
        if fp is not None and isinstance(fp.get("spec"), dict):
            spec = fp["spec"]
            break
    root = _data_root_of(folder, category)
    args = ["python", "scripts/extract.py", "--backbone", backbone, "--category", category,
            "--data-root", root or "DATA_ROOT", "--banks-dir", str(banks_dir)]
    flags = {"weights": "--weights", "layers": "--layers", "image_size": "--image-size",
             "crop": "--crop", "normalize": "--normalize", "augment": "--augment",
             "augment_ops": "--augment-ops"}
    for key, flag in flags.items():
        value = spec.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        args += [flag, str(value)]
    return " ".join(shlex.quote(a) if a != "DATA_ROOT" else a for a in args)


def config_of(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint shared by the train and test banks of one configuration."""
    return {k: v for k, v in fingerprint.items() if k not in PER_SPLIT_KEYS}


def fingerprint_diff(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable ``key: found != expected`` for every key whose value differs."""
    keys = sorted(set(found) | set(expected))
    return [
        f"{k}: {found.get(k)!r} != {expected.get(k)!r}"
        for k in keys
        if _jsonable(found.get(k)) != _jsonable(expected.get(k))
    ]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def read_fingerprint(paths: BankPaths) -> dict[str, Any] | None:
    """The stored fingerprint when it parses as a JSON object, else None (absent/unfinished)."""
    try:
        found = json.loads(paths.json.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def check_fingerprint(fp: Any, paths: BankPaths) -> list[str]:
    """Problems that make a stored fingerprint unusable (empty when it is well-formed)."""
    if not isinstance(fp, dict):
        return ["not a JSON object"]
    if "format" not in fp:
        return ["not a bank fingerprint (no 'format' key)"]
    if fp.get("format") != BANK_FORMAT:
        return [f"bank format {fp.get('format')!r}, this patchbank reads {BANK_FORMAT}"]
    bad = BankFingerprint.problems(fp)
    if not bad and fp["split"] != paths.split:
        bad.append(f"split {fp['split']!r} in a {paths.split} file")
    return bad


def bank_status(paths: BankPaths, fingerprint: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(``"missing"`` | ``"stale"`` | ``"broken"`` | ``"complete"``, reasons).

    "complete" means readable and consistent (every tap file present with the stated shape and
    dtype, CSV rows = images), not just present; "broken" is a bank with the right fingerprint
    whose files are damaged or missing.
    """
    found = read_fingerprint(paths)
    if found is None:
        return ("broken", ["fingerprint unreadable"]) if paths.json.exists() else ("missing", [])
    problems = check_fingerprint(found, paths)
    if problems:
        return "stale", problems
    diff = fingerprint_diff(found, fingerprint)
    if diff:
        return "stale", diff
    problems = verify_files(paths, found)
    return ("broken", problems) if problems else ("complete", [])


def _open_tap(path: Path, shape: Sequence[int]) -> np.ndarray:
    """Memory-map one tap file, checking its header against the fingerprint."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.float16 or tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path.name} holds {arr.dtype} {tuple(arr.shape)}, the fingerprint "
                         f"says float16 {tuple(shape)}")
    return arr


def verify_files(paths: BankPaths, fp: Mapping[str, Any]) -> list[str]:
    """Check the files a (well-formed) fingerprint names: shapes, dtypes, CSV row count."""
    n = fp["n_images"]
    problems = []
    for t in fp["taps"]:
        try:
            _open_tap(paths.tap(t["layer"]), (n, *t["shape"]))
        except (OSError, ValueError, EOFError) as err:
            problems.append(f"{paths.tap(t['layer']).name}: {err}")
    try:
        rows = sum(1 for _ in paths.csv.open()) - 1
        if rows != n:
            problems.append(f"{paths.csv.name} has {rows} rows for {n} images")
    except OSError as err:
        problems.append(f"{paths.csv.name}: {err.strerror or err}")
    return problems


class BankWriter:
    """Stream tapped layers into a bank without holding the dataset in memory.

    Each layer goes straight into its own temporary ``.npy`` (header first, then rows in
    order); batches that arrive early wait in memory for the rows before them. :meth:`commit`
    writes the CSV and the fingerprint and renames everything into place, fingerprint last. If
    the writer is closed without commit (an exception, a kill), the temporary files are removed
    and any previous bank at that place is left as it was.
    """

    def __init__(self, paths: BankPaths, n: int, layers: Sequence[int],
                 shapes: Sequence[tuple[int, int, int]]) -> None:
        self.paths = paths
        self.n = n
        self.layers = [int(x) for x in layers]
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        paths.folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(paths.folder)
        self._tmp: dict[Path, AtomicFile] = {}
        self._files = []
        self._targets: list[Path] = []
        try:
            for layer, shape in zip(self.layers, self.shapes, strict=True):
                final = paths.tap(layer)
                tmp = self._tmp[final] = AtomicFile(final)
                f = tmp.tmp.open("wb")
                self._files.append(f)
                self._targets.append(final)
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                             "shape": (n, *shape)})
                # the whole file is reserved now: a full disk stops the run before the model
                # computes anything, with the file named
                preallocate(f, len(header.getvalue()) + 2 * n * int(np.prod(shape)), final)
                f.write(header.getvalue())
        except OSError as err:
            self.close()
            name_error(err, self._targets[-1] if self._targets else paths.folder)
            raise
        except BaseException:
            self.close()
            raise
        self._next = 0  # rows before this one are written
        self._early: dict[int, list[np.ndarray]] = {}  # first row -> batch waiting

    def write(self, indices: np.ndarray, taps: Sequence[np.ndarray]) -> None:
        """Store one batch: ``taps[i]`` is (B, h_i, w_i, C_i) for consecutive rows ``indices``."""
        indices = np.asarray(indices)
        if len(indices) == 0:
            return
        start = int(indices[0])
        ok = np.array_equal(indices, np.arange(start, start + len(indices))) and \
            len(taps) == len(self.shapes) and all(
                t.shape == (len(indices), *s) for t, s in zip(taps, self.shapes, strict=True))
        if not ok:
            raise ValueError(f"expected taps {self.shapes} for consecutive rows, got "
                             f"{[t.shape for t in taps]} for rows {indices.tolist()}")
        self._early[start] = [np.ascontiguousarray(t, dtype=np.float16) for t in taps]
        while self._next in self._early:
            batch = self._early.pop(self._next)
            for f, t, target in zip(self._files, batch, self._targets, strict=True):
                try:
                    f.write(t.data)
                except OSError as err:
                    name_error(err, target)
                    raise
            self._next += len(batch[0])

    def commit(self, meta: pd.DataFrame, fingerprint: Mapping[str, Any]) -> None:
        """Finish the bank: every image must have been written."""
        if self._next != self.n or self._early:
            missing = self.n - self._next - sum(len(b[0]) for b in self._early.values())
            raise BankError(f"{self.paths.describe()}: {missing} images were never written; "
                            "re-run")
        if not meta_columns_ok(meta.columns) or len(meta) != self.n:
            raise ValueError(f"meta must have columns {META_COLUMNS} and {self.n} rows")
        p = self.paths
        target = p.folder
        try:
            for f, tap in zip(self._files, self._targets, strict=True):
                target = tap
                f.close()
            tmp_csv = self._tmp[p.csv] = AtomicFile(p.csv)
            tmp_json = self._tmp[p.json] = AtomicFile(p.json)
            target = p.csv
            meta.to_csv(tmp_csv.tmp, index=False)
            target = p.json
            tmp_json.tmp.write_text(json.dumps(dict(fingerprint), indent=2, sort_keys=True))
        except OSError as err:
            name_error(err, target, self._tmp[target].tmp if target in self._tmp else None)
            raise
        # The old fingerprint goes first: from here until the new one lands the bank reads as
        # incomplete, never as a complete bank with mismatched parts.
        p.json.unlink(missing_ok=True)
        for final, tmp in self._tmp.items():
            if final != p.json:
                tmp.commit()
        tmp_json.commit()
        self.close()

    def close(self) -> None:
        """Drop temporary files (safe to call twice)."""
        self._early = {}
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass  # the disk failed: the file is removed anyway
        for tmp in self._tmp.values():
            tmp.discard()
        self._tmp.clear()

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_tags(banks_dir: Path, backbone: str, category: str) -> list[str]:
    """Tags of the complete-looking test banks of ``backbone``/``category`` (sorted)."""
    root = Path(banks_dir) / backbone
    tags = sorted(p.parent.parent.name for p in root.glob(f"*/{category}/test.json"))
    old = root / category / "test.json"
    if old.is_file():
        log.warning("%s: bank from an older patchbank (format 1) ignored; delete %s and "
                    "re-extract", old, old.parent)
    return tags


def load_bank(banks_dir: Path, backbone: str, tag: str, category: str, split: str,
              expect: Mapping[str, Any] | None = None) -> Bank:
    """Load one bank (taps memory-mapped), refused with a one-line BankError when it is absent,
    damaged, inconsistent with its folder, or (with ``expect``) built with other settings."""
    paths = BankPaths.of(banks_dir, backbone, tag, category, split)
    fix = f"re-run `{extract_command(banks_dir, backbone, tag, category)} --overwrite`"
    fp = read_fingerprint(paths)
    if fp is None:
        state = "unreadable" if paths.json.exists() else "missing"
        raise BankError(f"{paths.json}: {split} bank {state}; {fix}")
    problems = check_fingerprint(fp, paths)
    if not problems:
        where = {"backbone": backbone, "category": category, "tag": tag}
        problems = fingerprint_diff({k: fp.get(k) for k in where}, where)
        if problems:
            problems = [f"the fingerprint does not belong in this folder ({'; '.join(problems)})"]
    if not problems and expect is not None:
        diff = fingerprint_diff({k: fp.get(k) for k in expect}, expect)
        if diff:
            problems = [f"built with another configuration ({'; '.join(diff)})"]
    if problems:
        raise BankError(f"{paths.json}: {'; '.join(problems)}; {fix}")
    n = fp["n_images"]
    try:
        taps = {t["layer"]: _open_tap(paths.tap(t["layer"]), (n, *t["shape"]))
                for t in fp["taps"]}
        meta = pd.read_csv(paths.csv, keep_default_na=False, dtype={"mask_path": str})
    except (OSError, ValueError, EOFError) as err:
        raise BankError(f"{paths.describe()}: unreadable bank ({str(err).splitlines()[0]}); "
                        f"{fix}") from None
    if not meta_columns_ok(meta.columns) or len(meta) != n:
        raise BankError(f"{paths.csv}: does not match the bank ({len(meta)} rows for {n} "
                        f"images); {fix}")
    return Bank(taps=taps, meta=meta, fingerprint=fp)


def load_pair(banks_dir: Path, backbone: str, tag: str, category: str) -> tuple[Bank, Bank]:
    """Train and test banks of one category, refused unless built with one configuration."""
    train = load_bank(banks_dir, backbone, tag, category, "train")
    test = load_bank(banks_dir, backbone, tag, category, "test")
    diff = fingerprint_diff(config_of(test.fingerprint), config_of(train.fingerprint))
    if diff:
        raise BankError(
            f"{BankPaths.of(banks_dir, backbone, tag, category, 'test').json}: test bank was "
            f"built differently from the train bank ({'; '.join(diff)}); re-extract both: "
            f"`{extract_command(banks_dir, backbone, tag, category)} --overwrite`"
        )
    return train, test
