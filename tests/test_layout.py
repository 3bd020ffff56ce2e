"""The package layout, checked from the source with ``ast`` (nothing is imported).

* rooms (sub-packages) import only from rooms below them, in the README's order;
* no import cycles between modules;
* no function over 80 lines in ``src/`` or ``scripts/``;
* nothing loose at the package root but ``__init__.py`` and ``__main__.py``;
* every ``scripts/*.py`` at most 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "patchbank"
SCRIPTS = REPO / "scripts"

#: Room ranks, low to high: a room imports only rooms of a lower rank (rooms of equal rank do
#: not import each other). ``<init>`` is the package's ``__init__.py`` (the version; anything
#: may import it, it imports nothing of patchbank); ``<main>`` its ``__main__.py`` (the top).
ROOM_RANK: dict[str, int] = {
    "<init>": 0,
    "core": 1,
    "data": 2,
    "synth": 3,
    "features": 4,
    "store": 5,
    "scorers": 6,
    "evaluation": 7,
    "stages": 8,
    "sweep": 9,
    "inference": 9,
    "app": 10,
    "cli": 11,
    "bench": 11,
    "<main>": 12,
}
MAX_FUNCTION_LINES = 80
MAX_SCRIPT_LINES = 60
ROOT_FILES = {"__init__.py", "__main__.py"}



def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("patchbank", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imported(module: str, path: Path) -> set[str]:
    """The patchbank modules (or packages) ``module`` imports anywhere in its file, functions
    and ``TYPE_CHECKING`` blocks included; ``from pkg import name`` counts as ``pkg.name``
    when that is a module, else as ``pkg``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in MODULES else source)
    return {m for m in out if m == "patchbank" or m.startswith("patchbank.")}


IMPORTS = {module: _imported(module, path) for module, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "<init>"
    if parts[1] == "__main__":
        return "<main>"
    return parts[1]


def test_every_room_has_a_rank() -> None:
    rooms = {_room(m) for m in MODULES}
    assert rooms - set(ROOM_RANK) == set(), "give each new sub-package a rank in ROOM_RANK"
    assert len(rooms - {"<init>", "<main>"}) >= 5


def test_rooms_import_only_lower_rooms() -> None:
    bad = []
    for module, targets in IMPORTS.items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            if other != room and ROOM_RANK[other] >= ROOM_RANK[room]:
                bad.append(f"{module} ({room}) imports {target} ({other})")
    assert bad == [], "\n".join(bad)


def test_the_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a core module importing stages is reported."""
    fake = tmp_path / "up.py"
    fake.write_text("def f():\n    from patchbank.stages.score import score_category\n")
    targets = _imported("patchbank.core.up", fake)
    assert targets == {"patchbank.stages.score"}
    assert ROOM_RANK[_room("patchbank.stages.score")] > ROOM_RANK[_room("patchbank.core.up")]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = {m: {t for t in ts if t in MODULES and t != "patchbank"} for m, ts in IMPORTS.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_over_80_lines() -> None:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(SCRIPTS.rglob("*.py"))
    long = {f"{p.relative_to(REPO)}::{name}": n for p in files for name, n in _long_functions(p)}
    assert long == {}



def test_nothing_loose_at_the_package_root() -> None:
    loose = {p.name for p in PACKAGE.iterdir()
             if p.is_file() and p.suffix == ".py" and p.name not in ROOT_FILES}
    assert loose == set(), "move these into a sub-package"


def test_scripts_are_at_most_60_lines() -> None:
    long = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
            for p in sorted(SCRIPTS.glob("*.py"))}
    over = {k: n for k, n in long.items() if n > MAX_SCRIPT_LINES}
    assert over == {}

