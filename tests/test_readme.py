"""The README runs as written: every fenced ``bash`` block is executed, in order, in one
temporary working folder (so ``featurebanks/``, ``scores/`` and the demo's ``data/demo`` land
there and later blocks use what earlier ones made).

A block whose info string names a need (```` ```bash needs-mvtec ````) is skipped with that
reason: ``needs-mvtec`` (the real MVTec AD folder), ``needs-hub`` (hub weights: no internet
here), ``needs-gpu``, ``needs-cluster`` (several machines), ``setup`` (``make run`` /
``make test`` themselves: CI runs ``make test``, and ``make run`` is the pipeline the other
blocks run stage by stage). ``patchbank`` and ``python`` run with this interpreter, scripts
from this checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NEEDS = {
    "needs-mvtec": "needs the real MVTec AD folder (--data-root)",
    "needs-hub": "needs hub weights (no internet here)",
    "needs-gpu": "needs a CUDA GPU",
    "needs-cluster": "needs several machines (a Ray cluster)",
    "setup": "the README's set-up commands themselves (CI runs make test)",
}
FENCE = re.compile(r"^```(\S*)(.*)$")


def readme_blocks(text: str) -> list[tuple[int, list[str], list[str]]]:
    """(first line number, tags, commands) of every ```` ```bash ```` block: continuation
    lines joined, comments and blank lines dropped."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        lang, tags, start = m.group(1), m.group(2).split(), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang != "bash":
            continue
        joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(body))
        commands = [c.split(" #")[0].strip() for c in joined.splitlines()]
        blocks.append((start, tags, [c for c in commands if c and not c.startswith("#")]))
    return blocks


def runnable(command: str) -> list[str]:
    """The command as argv for this interpreter and checkout."""
    argv = shlex.split(command)
    if argv[0] == "patchbank":
        return [sys.executable, "-m", "patchbank", *argv[1:]]
    if argv[0] == "python":
        script = Path(argv[1])
        return [sys.executable, str(REPO / script if not script.is_absolute() else script),
                *argv[2:]]
    raise AssertionError(f"README command {command!r}: start it with `patchbank` or `python`, "
                         "or tag its block (see this module's docstring)")


BLOCKS = readme_blocks(README.read_text())


def test_readme_has_runnable_blocks() -> None:
    untagged = [b for b in BLOCKS if not b[1]]
    assert len(untagged) >= 3, "the README lost its runnable examples"
    assert all(set(tags) <= set(NEEDS) for _, tags, _ in BLOCKS), \
        f"unknown README block tags; known: {sorted(NEEDS)}"


def test_readme_block_parser() -> None:
    text = "x\n```bash needs-gpu\na \\\n  b  # c\n# d\n```\n```python\nz\n```\n```bash\ne\n```\n"
    assert readme_blocks(text) == [(2, ["needs-gpu"], ["a b"]), (10, [], ["e"])]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.parametrize("start,tags,commands", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(start: int, tags: list[str], commands: list[str],
                           workdir: Path) -> None:
    for tag in tags:
        pytest.skip(f"README line {start}: {NEEDS.get(tag, tag)}")
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO / "src")}
    for command in commands:
        done = subprocess.run(runnable(command), cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, (
            f"README line {start}: `{command}` exited {done.returncode}\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
