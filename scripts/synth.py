"""Thin wrapper: see `python scripts/synth.py --help` and patchbank.synth.cli.synth_main."""

from patchbank.cli.synth import synth_main

if __name__ == "__main__":
    synth_main()
