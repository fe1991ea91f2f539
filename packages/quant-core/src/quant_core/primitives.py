"""Quantization primitives as plain functions: integer ranges, quantize/dequantize, int4 packing, scale codecs.

Conventions (``modelslim-format.md`` §4): weights are ``[N, K]`` (row = output channel); a stored offset is
*subtracted* (``w = (q - offset) * scale``); rounding is ``torch.round`` (half to even).
"""

import math
from collections.abc import Callable

import torch

INT8_RANGE = (-128, 127)
INT4_RANGE = (-8, 7)


def int_range(bits: int) -> tuple[int, int]:
    """Signed range of a ``bits``-bit integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# --- activations ---------------------------------------------------------------------------------------------
def token_amax(x32: torch.Tensor, amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``amax|x|`` over the last dim (``[..., 1]``); through ``amax_reduce`` when ``x`` is part of each row (the
    max over the row's parts, see ``kernels.base.Runtime``)."""
    amax = x32.abs().amax(dim=-1, keepdim=True)
    return amax if amax_reduce is None else amax_reduce(amax)


def quantize_per_token(
    x: torch.Tensor,
    bits: int = 8,
    clip_ratio: float = 1.0,
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic quantization over the last dim: ``s = clip_ratio * amax|x| / qmax``, ``q = round(x / s)``.

    Returns ``q`` (int8, values in the ``bits`` range) and ``s`` (float32, shape ``[..., 1]``). An all-zero row
    gets ``s = 0`` and ``q = 0``, so its output is exactly zero. ``amax_reduce``: see :func:`token_amax`.
    """
    lo, hi = int_range(bits)
    x32 = x.float()
    scale = token_amax(x32, amax_reduce) * clip_ratio / hi
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x32 / safe), lo, hi).to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Static asymmetric quantization: ``q = clamp(round(x / scale + offset))`` as int8."""
    lo, hi = int_range(bits)
    return torch.clamp(torch.round(x.float() / scale.float() + offset.float()), lo, hi).to(torch.int8)


def int_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact ``x_q [M, K] @ w_q [N, K]ᵀ`` with int32 accumulation (|products| ≤ 2^14, so K ≤ 2^16 cannot overflow)."""
    return torch.matmul(x_q.to(torch.int32), w_q.to(torch.int32).T)


# --- weights -------------------------------------------------------------------------------------------------
def quantize_weight_per_channel(
    weight: torch.Tensor, bits: int = 8, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per output channel. Returns ``q`` int8 ``[N, K]``, ``scale`` and ``offset`` fp32 ``[N, 1]``."""
    return quantize_weight_per_group(weight, bits, weight.shape[-1], symmetric)


def quantize_weight_per_group(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group of ``group_size`` along K.

    Returns ``q`` int8 ``[N, K]``, ``scale`` and ``offset`` fp32 ``[N, K / group_size]`` with
    ``w ≈ (q - offset) * scale``; ``offset`` holds integers (zeros when symmetric).
    """
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide in_features {k}")
    lo, hi = int_range(bits)
    w = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = w.abs().amax(-1) / hi
        offset = torch.zeros_like(scale)
    else:
        wmin, wmax = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (wmax - wmin) / (hi - lo)
        offset = torch.round(lo - wmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float32).tiny))
    q = torch.clamp(torch.round(w / scale[..., None] + offset[..., None]), lo, hi).to(torch.int8)
    return q.reshape(n, k), scale, offset


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """``(q - offset) * scale`` in float32; ``scale``/``offset`` are ``[N, 1]`` or ``[N, K / g]`` (per group)."""
    n, k = q.shape
    groups = scale.shape[-1]
    w = q.float().reshape(n, groups, k // groups)
    off = 0.0 if offset is None else offset.float().reshape(n, groups, 1)
    return ((w - off) * scale.float().reshape(n, groups, 1)).reshape(n, k)


# --- int4 packing --------------------------------------------------------------------------------------------
def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """ModelSlim's int4 layout: ``[N, K]`` values in [-8, 7] -> int8 ``[N/2, K]``; row 2j in the low nibble of
    byte ``[j, k]``, row 2j+1 in the high nibble."""
    if values.shape[0] % 2:
        raise ValueError(f"int4 packing along the output dim needs an even number of rows, got {values.shape[0]}")
    v = values.to(torch.int16)
    byte = (v[0::2] & 0xF) | ((v[1::2] & 0xF) << 4)
    return byte.to(torch.uint8).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_rows`: int8 ``[N/2, K]`` -> int8 ``[N, K]`` with sign-extended nibbles."""
    p = packed.view(torch.int8)
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)  # arithmetic shift sign-extends
    high = torch.bitwise_right_shift(p, 4)
    return torch.stack((low, high), dim=1).reshape(2 * p.shape[0], *p.shape[1:])


def pack_int4_words(values: torch.Tensor) -> torch.Tensor:
    """NPU int4 layout (``npu_convert_weight_to_int4pack``): ``[..., n]`` values in [-8, 7] -> int32
    ``[..., n/8]``, element ``8j+i`` in bits ``4i..4i+3``."""
    if values.shape[-1] % 8:
        raise ValueError(f"packing 8 int4 per int32 needs a last dim divisible by 8, got {values.shape[-1]}")
    nibbles = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int4_words(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_words`: int32 ``[..., n/8]`` -> int8 ``[..., n]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32)[..., None] >> shifts) & 0xF
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.int8)


# --- scale encodings -----------------------------------------------------------------------------------------
def encode_scale_int64(scale: torch.Tensor) -> torch.Tensor:
    """float32 scale -> int64 holding its bit pattern in the low 32 bits (``npu_trans_quant_param``)."""
    return scale.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def decode_scale_int64(encoded: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_scale_int64` (the int64 -> int32 conversion wraps back to the bit pattern)."""
    return (encoded & 0xFFFFFFFF).to(torch.int32).view(torch.float32)


def as_float32(scale: torch.Tensor) -> torch.Tensor:
    """A scale as float32, whichever way the checkpoint stored it (fp32, bf16/fp16, or int64-encoded fp32)."""
    return decode_scale_int64(scale) if scale.dtype == torch.int64 else scale.float()


# --- FlatQuant -----------------------------------------------------------------------------------------------
def get_decompose_dim(k: int) -> tuple[int, int]:
    """``(L, R)`` with ``L * R = k``, ``L <= R``, as square as possible: the smallest ``a >= ceil(sqrt(k))`` with
    ``a² - k`` a perfect square ``b²`` gives ``(a - b, a + b)``. No such pair exists for ``k ≡ 2 (mod 4)``
    (``a² - b²`` is odd or a multiple of 4): a ``ValueError`` instead of the reference loop's endless search."""
    if k < 1 or k % 4 == 2:
        raise ValueError(
            f"in_features {k} is not a difference of two squares (k ≡ 2 mod 4 or k < 1), so FlatQuant's default "
            "L × R split does not exist; give the left factor's size explicitly (left_dim / a left_trans [a, a])."
        )
    a = math.isqrt(k)
    if a * a < k:
        a += 1
    while True:
        b = math.isqrt(a * a - k)
        if b * b == a * a - k:
            return a - b, a + b
        a += 1
