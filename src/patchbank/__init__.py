"""patchbank: staged, cached anomaly detection on MVTec AD-layout datasets.

Stages: extract -> score -> evaluate, with file formats between them (see the README).
"""

__version__ = "0.1.0"
