"""patchbank: staged, cached anomaly detection on MVTec AD-layout datasets (extract -> score -> evaluate)."""

__version__ = "0.1.0"
