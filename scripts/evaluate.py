"""Thin wrapper: see `python scripts/evaluate.py --help` and patchbank.cli.evaluate_main."""

from patchbank.cli.stages import evaluate_main

if __name__ == "__main__":
    evaluate_main()
