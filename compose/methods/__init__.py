"""The method registry: every composition method by name, iterated by the shared tests."""

from __future__ import annotations

from ..errors import UnknownMethodError
from .base import CompositionMethod
from .clora import CloraMethod
from .cmlora import CmloraMethod
from .composer import ComposerMethod
from .composite import CompositeMethod
from .freefuse import FreefuseMethod
from .klora import KloraMethod
from .loratorio import LoratorioMethod
from .merge import MergeMethod
from .regional import RegionalMethod
from .switch import SwitchMethod
from .tara import TaraMethod

METHODS: dict[str, type[CompositionMethod]] = {
    method.name: method
    for method in (
        MergeMethod,
        SwitchMethod,
        CompositeMethod,
        CmloraMethod,
        CloraMethod,
        ComposerMethod,
        TaraMethod,
        RegionalMethod,
        KloraMethod,
        LoratorioMethod,
        FreefuseMethod,
    )
}


def build_method(name: str, options=None) -> CompositionMethod:
    """A method object with validated options, or an error listing the known methods."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method '{name}'; choose one of {sorted(METHODS)}")
    return METHODS[name](options)
