"""Command lines: the ``patchbank`` command (:mod:`patchbank.cli.main`), one module per
subcommand group, and the shared runtime (:mod:`patchbank.cli.runtime`). Nothing below the
command line imports from here."""
