"""The shared command-line runtime: logging, one-line errors, exit codes, Ctrl-C and SIGTERM.

Every ``patchbank`` subcommand parses its own arguments, then hands a ``run(args)`` function to
:func:`run_command`, which turns every error a user can fix into one line on stderr and exit
code 2 (``PartialFailure``: one line per failed item, then a count), Ctrl-C into 130 and
SIGTERM into 143 after removing this process's temporaries.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from patchbank.core import atomic
from patchbank.core.errors import ITEM_ERRORS, PartialFailure, PatchbankError

log = logging.getLogger("patchbank")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description and epilog as written; appends ``(default: X)`` to a flag's help
    when it has a default worth stating and the text does not state one already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or isinstance(default, bool)):
            return text
        return f"{text} (default: %(default)s)"


def new_parser(prog: str | None, description: str, example: str,
               epilog: str = "") -> argparse.ArgumentParser:
    """A subcommand's parser; its ``--help`` ends with ``example`` (one command line)."""
    tail = (epilog.rstrip() + "\n\n" if epilog else "") + f"example:\n  {example}"
    return argparse.ArgumentParser(prog=prog, description=description, epilog=tail,
                                   formatter_class=HelpFormatter)


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``-v``: log at DEBUG level and log the traceback behind an error line."""
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging; with an error, also log its traceback")

def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``["k=1", "coreset=0.1"]`` -> ``{"k": "1", "coreset": "0.1"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PatchbankError(f"--param {item!r}: expected key=value, e.g. --param k=3")
        out[key.strip()] = value.strip()
    return out

def data_root(args: argparse.Namespace) -> Path:
    from patchbank.data.demo import ensure_demo_dataset

    return args.data_root if args.data_root is not None else ensure_demo_dataset()

def categories(args: argparse.Namespace, folder: Path, markers: Sequence[str],
                hint: str) -> list[str]:
    """Categories for stages that read banks/scores: the given ones, or every one with any of
    ``markers`` (globs relative to ``folder``, whose last folder is the category) on disk, so
    a category whose outputs are damaged or incomplete is reported, never silently skipped."""
    if args.category != "all":
        return list(dict.fromkeys(c.strip() for c in args.category.split(",") if c.strip()))
    found = sorted({p.parent.name for m in markers for p in folder.glob(m)})
    if not found:
        raise PatchbankError(f"{folder}: nothing found; run `{hint}` first")
    return found

def each_item(items: Sequence[str], fail_fast: bool, fn: Callable[[str], Any]) -> None:
    """``fn(item)`` for every item; unless ``fail_fast``, failures are collected and raised
    together at the end as :class:`PartialFailure`."""
    failures: list[tuple[str, BaseException]] = []
    for item in items:
        try:
            fn(item)
        except ITEM_ERRORS as err:
            if fail_fast:
                raise
            if len(items) > 1:
                log.error("%s: failed, going on with the others", item)
            failures.append((item, err))
    if failures:
        raise PartialFailure(failures, total=len(items))


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _output_options(args: argparse.Namespace, filename: str | None) -> str:
    """The output-folder options of this command as the user gave them, the one holding
    ``filename`` alone when it is under one of them."""
    options = [(flag, getattr(args, attr)) for flag, attr in
               (("--banks-dir", "banks_dir"), ("--scores-dir", "scores_dir"))
               if getattr(args, attr, None) is not None]
    if filename:
        try:
            target = Path(filename).resolve()
            inside = [(f, v) for f, v in options if target.is_relative_to(Path(v).resolve())]
        except (OSError, RuntimeError):
            inside = []
        options = inside or options
    return " or ".join(f"{flag} {value}" for flag, value in options)


def describe_error(err: BaseException, args: argparse.Namespace) -> str:
    """One line for the user: what failed (the file) and the fix; no class name."""
    if isinstance(err, PatchbankError):
        return " ".join(str(err).split()) if "\n" in str(err) else str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        tip = " or a smaller --batch-size" if hasattr(args, "batch_size") else ""
        return f"out of memory; close other programs, use a machine with more memory{tip}"
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        what = err.strerror or " ".join(str(err).split()) or type(err).__name__
        outputs = _output_options(args, err.filename)
        if err.errno in _FULL:
            hint = "free space on that file system" + (
                f", or point {outputs} at another one" if outputs else "")
        elif err.errno in _DENIED:
            hint = "make it writable" + (f", or point {outputs} elsewhere" if outputs else "")
        elif err.errno == errno.ENOENT and getattr(args, "data_root", None) is not None:
            hint = f"check the path (--data-root {args.data_root})"
        else:
            hint = "check the disk and the path, then re-run (finished outputs are kept)"
        return f"{where}{what}; {hint}"
    return " ".join(str(err).split()) or type(err).__name__


def _close_progress_bars() -> None:
    """Clear progress bars an exception left open, so the error starts its own line."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # a progress bar never hides the error
            pass


def _report(err: BaseException, args: argparse.Namespace) -> None:
    _close_progress_bars()
    if args.verbose:
        log.debug("details", exc_info=err)
    if isinstance(err, PartialFailure):
        for item, failure in err.failures:
            message = describe_error(failure, args)
            # the item (e.g. a category) is named unless the message already names it
            named = item.rsplit("/", 1)[-1] in message
            print(f"error: {message}" if named else f"error: {item}: {message}",
                  file=sys.stderr)
        if err.total != 1:
            total = f" of {err.total}" if err.total is not None else ""
            print(f"error: {len(err.failures)}{total} failed (listed above); everything else "
                  "finished", file=sys.stderr)
    else:
        print(f"error: {describe_error(err, args)}", file=sys.stderr)


def run_command(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
          argv: Sequence[str] | None) -> None:
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM removes this process's temporaries and exits through the finally blocks.
    try:
        installed = atomic.install_signal_cleanup()
    except ValueError:  # not the main thread: no handler, the atexit cleanup still runs
        installed = False
    try:
        run(args)
    except (PatchbankError, OSError, MemoryError) as err:
        _report(err, args)
        sys.exit(2)
    except RuntimeError as err:
        if type(err).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            raise
        _report(err, args)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: finished banks and runs are kept; re-run to continue",
              file=sys.stderr)
        sys.exit(130)
    except SystemExit as err:
        if err.code == 128 + signal.SIGTERM:
            _close_progress_bars()
            print("terminated: finished banks and runs are kept, unfinished files removed; "
                  "re-run to continue", file=sys.stderr)
        raise
    finally:
        if installed:
            atomic.uninstall_signal_cleanup()
