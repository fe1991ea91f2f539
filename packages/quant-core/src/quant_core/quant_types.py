"""Quant-type strings that occur in ModelSlim descriptions, and the layer kinds a scheme can serve."""

from typing import Literal, get_args

FLOAT = "FLOAT"

LayerKind = Literal["linear", "moe", "attention"]
LAYER_KINDS: tuple[str, ...] = get_args(LayerKind)

# Every type string msModelSlim 26.1.0 can write (modelslim-tool.md §4.3), plus the FlatQuant compositions
# of its v1 saver. Knowing them lets us tell "a real type we do not serve" from "a typo".
MODELSLIM_QUANT_TYPES: frozenset[str] = frozenset(
    [
        "FLOAT",
        "W8A16",
        "W8A8",
        "W8A8_DYNAMIC",
        "W8A8_MIX",
        "W8A8S",
        "W8A8SC",
        "W4A16",
        "W4A8_DYNAMIC",
        "W4A4_DYNAMIC",
        "W4A4_FLATQUANT_DYNAMIC",
        "W8A8_FLATQUANT_DYNAMIC",
        "W4A8_FLATQUANT_DYNAMIC",
        "FLOAT_FLATQUANT",
        "FLATQUANT_DYNAMIC",
        "FLATQUANT",
        "WFP8AFP8_DYNAMIC",
        "W8A8FP8_DYNAMIC",
        "W8A8_MXFP8",
        "W4A8_MXFP",
        "W4A8_MXFP8",
        "W4A4_MXFP4",
        "W4A4_MXFP4_DUALSCALE",
        "W4A4_MXFP4_SVD",
        "W4A4_MXFP4_FLATQUANT",
        "W4A16_MXFP4",
        "W16A16S",
        "W16A16SC",
        "NF4",
        "W8A8_TIMESTEP",
        "C8",
        "FAQuant",
        "FAKQuant",
        "INT8_DYNAMIC",
    ]
)
