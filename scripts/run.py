"""Thin wrapper: see `python scripts/run.py --help` and patchbank.cli.run_main."""

from patchbank.cli.stages import run_main

if __name__ == "__main__":
    run_main()
