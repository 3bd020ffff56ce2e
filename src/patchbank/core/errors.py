"""User-facing errors: one line naming the file and the fix, printed without a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class PatchbankError(Exception):
    """Base class; ``str(err)`` is a complete one-line message for the user."""


class DatasetError(PatchbankError):
    """The dataset folder, an image or a mask is missing, malformed or inconsistent."""


class WeightsError(PatchbankError):
    """Backbone weights cannot be found or do not fit the model."""


class BankError(PatchbankError):
    """A feature bank is missing, incomplete, or was built with another configuration."""


class ScoresError(PatchbankError):
    """Score outputs are missing or do not match what the caller expects."""


class MetricError(PatchbankError, ValueError):
    """A metric registration is invalid, or a registered metric returned something unusable."""


class PartialFailure(PatchbankError):
    """Some items of a multi-category run failed; the others finished.

    ``failures`` holds ``(item, exception)`` pairs in the order they happened (``item`` names
    what failed, e.g. a category); ``result`` is what the run returns for the items that
    finished. ``str(err)`` summarises; callers print one line per failure.
    """

    def __init__(self, failures: list[tuple[str, BaseException]], result: object = None,
                 total: int | None = None) -> None:
        self.failures = list(failures)
        self.result = result
        self.total = total
        of = f" of {total}" if total is not None else ""
        super().__init__(f"{len(self.failures)}{of} failed: "
                         f"{', '.join(item for item, _ in self.failures)}")


#: What one category of a multi-category run may fail with and the run still goes on: the
#: user-facing errors, a failing disk or file system, and memory running out. Anything else is
#: a bug and stops the run with its traceback.
ITEM_ERRORS: tuple[type[BaseException], ...] = (PatchbankError, OSError, MemoryError)


class SweepError(PatchbankError):
    """A sweep configuration (YAML file or flags) is malformed, or its executor cannot start."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the closest of ``choices`` to ``name``, else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
