"""Thin wrapper: see `python scripts/sweep.py --help` and patchbank.sweep.cli.sweep_main."""

from patchbank.cli.sweep import sweep_main

if __name__ == "__main__":
    sweep_main()
