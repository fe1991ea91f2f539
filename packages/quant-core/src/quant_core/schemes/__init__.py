"""Scheme contracts and the built-in schemes, one module per algorithm.

Importing this package imports every public module in it, and each registers its schemes.
"""

import importlib
import pkgutil

from quant_core.schemes.base import AttentionScheme, LinearScheme, MoEScheme, Scheme

__all__ = ["AttentionScheme", "LinearScheme", "MoEScheme", "Scheme"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
