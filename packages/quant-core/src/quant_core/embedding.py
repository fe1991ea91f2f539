"""Quantized embedding lookup: the rows of a dequantized table for given token ids, without the float table.

A quantized ``embed_tokens`` is stored like a linear layer whose output rows are the vocabulary (``N = V``) and whose
input dim is the hidden size (``K = H``), under its linear scheme's tensor names. Supported (:data:`EMBEDDING_SCHEMES`),
each with per-row parameters, per channel or per group along ``H``:

==================  ====================================================  ============================================
quant type          checkpoint tensors under ``<prefix>.``                row ``v`` of the float table
==================  ====================================================  ============================================
``W8A16``           ``weight`` int8 ``[V, H]``; ``weight_scale``,         ``(weight[v] - offset[v]) · scale[v]``
                    ``weight_offset`` ``[V, 1]`` (v0: non-zero offsets)
``W8A8_DYNAMIC``    as W8A16, offsets zero (symmetric)                    ``weight[v] · scale[v]`` (the activation
                                                                          quantization does not apply to a lookup)
``W4A16``           ``weight`` int8 ``[V/2, H]`` (rows 2j / 2j+1 in the   ``(w4[v, h] - offset[v, h // g]) ·
                    low / high nibble of byte row j); ``weight_scale``,   scale[v, h // g]``
                    ``weight_offset`` ``[V, H/g]`` (``g``: group_size)
``W4A8_DYNAMIC``    ``weight`` int8 ``[V/2, H]`` packed as W4A16;         per channel: ``w4[v] · scale[v]``; two-step
                    ``weight_scale`` ``[V, 1]``, ``scale_bias``; with     (group_size g > 0): ``w4[v, h] · scale[v] ·
                    group_size > 0 ``weight_scale_second`` ``[V, H/g]``   second[v, h // g]``
==================  ====================================================  ============================================

Scales are float32 (v1) or the model dtype (v0). :func:`prepare_embedding` validates the tensors with the linear
scheme's own checks (shapes, dtypes, finite positive scales, symmetric offsets, W4A8's ``scale_bias`` checksum) and
returns an :class:`EmbeddingTable`: the int8 weight as stored (int4 stays packed) plus float32 per-row scales
``[V, G]`` and offsets. :func:`embedding_lookup` gathers the int rows of the requested ids (for packed int4 the byte
row ``id // 2`` and its nibble ``id % 2``) and their scales, and dequantizes only those rows.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from quant_core.errors import CheckpointTensorError, UnsupportedSchemeError
from quant_core.registry import get_scheme

EMBEDDING_SCHEMES = ("W8A16", "W8A8_DYNAMIC", "W4A16", "W4A8_DYNAMIC")
PACKED_SCHEMES = frozenset({"W4A16", "W4A8_DYNAMIC"})  # two int4 rows per byte along V


@dataclass(frozen=True)
class EmbeddingTable:
    """A quantized ``[V, H]`` table ready for :func:`embedding_lookup`.

    ``weight``: int8 ``[V, H]``, or ``[V/2, H]`` when ``packed`` (two int4 vocab rows per byte). ``scale``: float32
    ``[V, G]``, one scale per group of ``H / G`` consecutive values of a row (``G = 1``: per channel). ``offset``:
    float32 ``[V, G]``, subtracted from the int values before scaling, or ``None`` (symmetric).
    """

    quant_type: str
    weight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    packed: bool

    @property
    def num_embeddings(self) -> int:
        return self.scale.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]


def check_embedding_scheme(quant_type: str, layer: str = "") -> None:
    """Raise :class:`UnsupportedSchemeError` naming ``layer`` unless the lookup supports ``quant_type``."""
    if quant_type not in EMBEDDING_SCHEMES:
        raise UnsupportedSchemeError(
            f"embedding layer {layer or '<embedding>'!r} is {quant_type}: quantized embedding lookups support "
            f"{', '.join(EMBEDDING_SCHEMES)} (int weights with per-row scales). Keep the embedding FLOAT or "
            "quantize it with one of those."
        )


def prepare_embedding(
    quant_type: str, tensors: Mapping[str, torch.Tensor], *, group_size: int = 0, layer: str = ""
) -> EmbeddingTable:
    """Checkpoint tensors of a quantized embedding (names as in the table above) -> :class:`EmbeddingTable`.

    ``group_size`` is the description's global one (W4A16, W4A8_DYNAMIC). Bad tensors raise
    :class:`~quant_core.errors.CheckpointTensorError` naming ``layer``; an unsupported quant type
    :class:`~quant_core.errors.UnsupportedSchemeError`. Validation may unpack int4 once; the table keeps it packed.
    """
    check_embedding_scheme(quant_type, layer)
    scheme = get_scheme(quant_type, "linear", backend="reference", group_size=group_size)
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2 or weight.dtype != torch.int8:
        got = "nothing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
        raise CheckpointTensorError(
            f"embedding layer {layer or '<embedding>'!r}: expected an int8 2-D 'weight' tensor for {quant_type}, got "
            f"{got}. The description's quant type does not match the checkpoint."
        )
    _, n, canonical = scheme.checked_canonical(tensors, layer)
    scale = canonical["weight_scale"].reshape(n, -1)
    if "weight_scale_second" in canonical:  # two-step W4A8: w4 · scale[v] · second[v, group]
        scale = scale * canonical["weight_scale_second"]
    offset = canonical.get("weight_offset")
    if offset is not None:
        offset = offset.reshape(n, -1) if offset.any() else None
    packed = quant_type in PACKED_SCHEMES
    stored = tensors["weight"] if packed else canonical["weight"]
    return EmbeddingTable(quant_type, stored.contiguous(), scale.contiguous(), offset, packed)


def embedding_lookup(table: EmbeddingTable, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ids`` (any shape, integer, each in ``[0, V)``) -> ``[*ids.shape, H]`` rows of the dequantized table in
    ``dtype``, computed in float32 from the gathered rows only."""
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"embedding ids must be integers, got {ids.dtype}")
    flat = ids.reshape(-1).long()
    if table.packed:
        byte = table.weight.index_select(0, flat // 2)
        low = torch.bitwise_right_shift(torch.bitwise_left_shift(byte, 4), 4)  # arithmetic shifts sign-extend
        high = torch.bitwise_right_shift(byte, 4)
        q = torch.where((flat % 2 == 1)[:, None], high, low)
    else:
        q = table.weight.index_select(0, flat)
    groups = table.scale.shape[1]
    rows = q.float().view(flat.shape[0], groups, table.embedding_dim // groups)
    if table.offset is not None:
        rows = rows - table.offset.index_select(0, flat)[:, :, None]
    rows = rows * table.scale.index_select(0, flat)[:, :, None]
    return rows.view(*ids.shape, table.embedding_dim).to(dtype)
