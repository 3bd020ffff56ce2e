"""User-facing errors: one line naming the file and the fix, printed without a traceback."""


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
