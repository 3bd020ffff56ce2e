"""Find score runs in a scores folder: by method, or by run name (or a unique prefix of one).

A run is a folder ``<scores_dir>/<backbone>/<run>/`` holding one folder per category (see
:mod:`patchbank.store.runs`). Its method is the ``method`` of any of its categories'
``run.json``; a run with no readable ``run.json`` yet is listed under the method its name
starts with (the score stage names runs ``<method>-<bank tag>-<hash>``).

Every "not found" error names the runs that do exist and the score command that makes the
missing one, never the command the user just ran.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from patchbank.core.errors import ScoresError, did_you_mean

#: files whose presence makes a category folder part of a run (complete or not).
RUN_MARKERS = ("run.json", "image_scores.csv", "maps.npz", "model.npz", "metrics.json")
#: run-folder names that are not runs (figures and tables of the evaluate/compare stages).
NOT_RUNS = frozenset({"figures", "compare", "sweeps"})


@dataclass(frozen=True)
class RunRef:
    """One run folder: its name, method and the categories it holds (sorted)."""

    backbone: str
    name: str
    method: str
    categories: tuple[str, ...]

    def describe(self) -> str:
        cats = ",".join(self.categories) or "no categories yet"
        return f"{self.name} ({self.method}; {cats})"


def _method_of(run_dir: Path, categories: Sequence[str]) -> str:
    for category in categories:
        try:
            info = json.loads((run_dir / category / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("method"), str):
            return info["method"]
    return run_dir.name.split("-", 1)[0]


def list_runs(scores_dir: Path, backbone: str) -> list[RunRef]:
    """Every run folder of ``backbone`` with at least one category, sorted by name."""
    runs = []
    folder = Path(scores_dir, backbone)
    for run_dir in sorted(p for p in folder.glob("*") if p.is_dir()):
        if run_dir.name in NOT_RUNS or run_dir.name.startswith("."):
            continue
        cats = sorted({p.parent.name for m in RUN_MARKERS for p in run_dir.glob(f"*/{m}")})
        if cats:
            runs.append(RunRef(backbone, run_dir.name, _method_of(run_dir, cats), tuple(cats)))
    return runs


def score_hint(scores_dir: Path, backbone: str, method: str | None,
               category: str | None) -> str:
    """The command that makes a run of ``method`` (METHOD when unknown)."""
    args = ["patchbank", "score", "--backbone", backbone, "--method", method or "METHOD"]
    if category and category != "all":
        args += ["--category", category]
    if Path(scores_dir) != Path("scores"):
        args += ["--scores-dir", str(scores_dir)]
    return " ".join(shlex.quote(a) for a in args)


def _existing(runs: Sequence[RunRef]) -> str:
    return "; ".join(r.describe() for r in runs) if runs else "none"


def _has(run: RunRef, categories: Sequence[str] | None) -> bool:
    return not categories or any(c in run.categories for c in categories)


def find_runs(scores_dir: Path, backbone: str, *, method: str | None = None,
              run: str | None = None, categories: Sequence[str] | None = None) -> list[RunRef]:
    """The runs that ``--method`` or ``--run`` select, holding any of ``categories`` (None or
    empty: any category).

    ``run``: a run folder name or a unique prefix of one (an exact name always wins).
    ``method``: every run of that method; for compatibility, a value that is the exact name of
    a run folder selects that run. Raises a one-line :class:`ScoresError` when nothing (or,
    for ``run``, more than one) matches, listing the runs that exist.
    """
    if (method is None) == (run is None):
        raise ScoresError("pass --method METHOD or --run NAME (one of the two)")
    cats = [c for c in (categories or []) if c != "all"]
    where = f" with category {','.join(cats)}" if cats else ""
    runs = list_runs(scores_dir, backbone)
    folder = Path(scores_dir, backbone)
    if run is not None:
        exact = [r for r in runs if r.name == run]
        found = exact or [r for r in runs if r.name.startswith(run)]
        if len(found) > 1:
            raise ScoresError(f"{folder}: --run {run!r} matches {len(found)} runs: "
                              f"{', '.join(r.name for r in found)}; give more of the name")
        if not found or not _has(found[0], cats):
            raise ScoresError(
                f"{folder}: no run {run!r}{where}; runs here: {_existing(runs)}; make one with "
                f"`{score_hint(scores_dir, backbone, None, cats[0] if cats else None)}`")
        return found
    found = [r for r in runs if r.method == method and _has(r, cats)]
    if not found:
        found = [r for r in runs if r.name == method and _has(r, cats)]
    if not found:
        raise ScoresError(
            f"{folder}: no run of method {method!r}{where}"
            f"{did_you_mean(method, {r.method for r in runs})}; runs here: {_existing(runs)}; make "
            f"one with `{score_hint(scores_dir, backbone, method, cats[0] if cats else None)}`")
    return found


def find_one_run(scores_dir: Path, backbone: str, *, method: str | None = None,
                 run: str | None = None, categories: Sequence[str] | None = None) -> RunRef:
    """:func:`find_runs` that must select exactly one run (predict, compare): with several
    runs of the method, the error lists them and asks for ``--run NAME``."""
    found = find_runs(scores_dir, backbone, method=method, run=run, categories=categories)
    if len(found) > 1:
        raise ScoresError(
            f"{Path(scores_dir, backbone)}: {len(found)} runs of method {method!r}: "
            f"{'; '.join(r.describe() for r in found)}; pick one with --run NAME")
    return found[0]


def resolve_run_name(scores_dir: Path, backbone: str, item: str,
                     categories: Sequence[str] | None = None) -> str:
    """One run from a run name, a unique prefix of one, or a method with exactly one run
    (``compare --runs patchcore,padim``); a one-line :class:`ScoresError` otherwise."""
    names = [r.name for r in list_runs(scores_dir, backbone)]
    if item in names or sum(n.startswith(item) for n in names) == 1:
        return find_runs(scores_dir, backbone, run=item, categories=categories)[0].name
    return find_one_run(scores_dir, backbone, method=item, categories=categories).name
