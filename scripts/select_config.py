"""Thin wrapper: see `python scripts/select_config.py --help` and
patchbank.synth.cli.select_main. (Not ``select.py``: a file of that name in scripts/ would shadow
the standard library's ``select`` module for every script in this folder.)"""

from patchbank.cli.synth import select_main

if __name__ == "__main__":
    select_main()
