"""Synthetic anomalies for validation without real defects (:mod:`.generators`, :mod:`.dataset`).

Generators paste seeded CutPaste, CutPaste-scar, DRAEM-style Perlin and the demo dataset's
scratch/hole/stain defects into defect-free images with exact masks; ``write_synthetic_set``
turns a held-out part of a category's ``train/good`` into an MVTec-layout validation set.
"""

from patchbank.synth.dataset import DEFAULT_KINDS, write_synthetic_set
from patchbank.synth.generators import GENERATORS, generate

__all__ = ["DEFAULT_KINDS", "GENERATORS", "generate", "write_synthetic_set"]
