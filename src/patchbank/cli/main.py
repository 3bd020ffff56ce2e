"""The ``patchbank`` command: ``patchbank <subcommand> [options]``, one subcommand per stage or
product part. Each subcommand parses its own options (``patchbank <subcommand> --help``) and
runs through the shared runtime (:mod:`patchbank.cli.runtime`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from patchbank import __version__
from patchbank.core.errors import did_you_mean

#: subcommand -> (module, function, one line of help). ``scripts/*.py`` call the same functions.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "extract": ("patchbank.cli.stages", "extract_main", "images -> feature banks (cached)"),
    "score": ("patchbank.cli.stages", "score_main", "feature banks -> a score run (cached)"),
    "evaluate": ("patchbank.cli.stages", "evaluate_main",
                 "score runs -> metrics, leaderboard, figures"),
    "run": ("patchbank.cli.stages", "run_main", "extract -> score -> evaluate, then the "
            "leaderboard"),
    "predict": ("patchbank.cli.predict", "predict_main", "score new images with a fitted run"),
    "compare": ("patchbank.cli.compare", "compare_main",
                "paired comparison of runs on the same test images"),
    "sweep": ("patchbank.cli.sweep", "sweep_main", "grids of backbones x methods x shots x "
              "seeds, in-process or on Ray"),
    "synth": ("patchbank.cli.synth", "synth_main", "synthetic-defect validation sets"),
    "select": ("patchbank.cli.synth", "select_main",
               "pick a configuration on a synthetic validation set"),
    "app": ("patchbank.app.launch", "main", "the Streamlit app on 127.0.0.1"),
    "weights": ("patchbank.cli.weights", "weights_main",
                "where backbone weights come from; check the offline ones"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: patchbank <command> [options]   (patchbank {__version__})", "",
             "Unsupervised visual anomaly detection on MVTec AD-layout datasets.", "",
             "commands:"]
    lines += [f"  {name:{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "patchbank <command> --help shows a command's options and an example.",
              "example:", "  patchbank run --category demo_object --method padim,patchcore"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] == "--version":
        print(f"patchbank {__version__}")
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}{did_you_mean(name, COMMANDS)}; "
              f"`patchbank --help` lists them", file=sys.stderr)
        sys.exit(2)
    module, function, _ = COMMANDS[name]
    getattr(importlib.import_module(module), function)(rest, prog=f"patchbank {name}")
