"""Thin wrapper: see `python scripts/score.py --help` and patchbank.cli.score_main."""

from patchbank.cli.stages import score_main

if __name__ == "__main__":
    score_main()
