"""Device choice shared by every stage: CUDA when present and asked for, never required."""

from __future__ import annotations

import torch

from patchbank.core.errors import PatchbankError


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is checked and returned."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise PatchbankError(f"unknown device {device!r} ({err}); pass --device auto, cpu or "
                             "cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PatchbankError(f"device {device!r} requested but CUDA is not available; pass "
                             "--device cpu or --device auto")
    return dev
