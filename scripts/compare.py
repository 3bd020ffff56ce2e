"""Thin wrapper: see `python scripts/compare.py --help` and patchbank.cli.compare.compare_main."""

from patchbank.cli.compare import compare_main

if __name__ == "__main__":
    compare_main()
