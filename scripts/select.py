"""Thin wrapper: see `python scripts/select.py --help` and patchbank.synth.cli.select_main."""

import os
import sys

# This file's name shadows the standard library's `select` module (imported by subprocess,
# socket, ...) for as long as its folder is on the path: take the folder off first.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from patchbank.synth.cli import select_main  # noqa: E402

if __name__ == "__main__":
    select_main()
