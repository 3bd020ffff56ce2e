"""Thin wrapper: ``patchbank weights --check`` (see patchbank.cli.weights)."""

import sys

from patchbank.cli.weights import weights_main

if __name__ == "__main__":
    weights_main(["--check", *sys.argv[1:]])
