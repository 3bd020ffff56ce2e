"""``python -m patchbank``: the same as the ``patchbank`` command."""

from patchbank.cli.main import main

if __name__ == "__main__":
    main()
