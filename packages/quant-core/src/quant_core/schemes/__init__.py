"""Scheme contracts and, one module per algorithm, the built-in schemes (importing this registers them)."""

from quant_core.schemes.base import AttentionScheme, LinearScheme, MoEScheme, Scheme

__all__ = ["AttentionScheme", "LinearScheme", "MoEScheme", "Scheme"]
