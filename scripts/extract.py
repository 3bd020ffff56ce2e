"""Thin wrapper: see `python scripts/extract.py --help` and patchbank.cli.extract_main."""

from patchbank.cli.stages import extract_main

if __name__ == "__main__":
    extract_main()
