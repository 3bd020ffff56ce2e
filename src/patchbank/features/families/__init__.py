"""The backbone-family registry: a :class:`~patchbank.features.registry.BackboneSpec`'s
``family`` string names one :class:`BackboneFamily` here (builder, weight kinds, classifier
head, tap naming). Adding a family is one module in this package plus one line below."""

from __future__ import annotations

from patchbank.core.errors import WeightsError
from patchbank.features.families import hf_mae, pixels, timm_cnn, timm_vit
from patchbank.features.families.base import BackboneFamily

FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Add ``family`` under its name (an existing name is an error: unregister it first)."""
    if family.name in FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is already registered; "
                         "unregister_family it first or pick another name")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> BackboneFamily:
    """Remove and return the family ``name``."""
    return FAMILIES.pop(name)


def get_family(name: str, backbone: str = "") -> BackboneFamily:
    """The family called ``name`` (``backbone`` names the spec in the error)."""
    if name not in FAMILIES:
        raise WeightsError(f"{backbone or name}: unknown backbone family {name!r}; use one of "
                           f"{', '.join(FAMILIES)} or register_family() a new one")
    return FAMILIES[name]


register_family(timm_cnn.FAMILY)
register_family(timm_vit.FAMILY)
register_family(hf_mae.FAMILY)
register_family(pixels.FAMILY)
