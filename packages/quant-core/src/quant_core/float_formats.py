"""Low-precision float formats as plain functions: FP8 E4M3, FP4 E2M1, E8M0 block exponents (MX) and their quantizers.

Conventions (``modelslim-format.md`` §6.3, checked against msModelSlim 26.1.0 output, ``modelslim-tool.md`` §4.13):

* FP8 is ``torch.float8_e4m3fn`` (largest finite value 448).
* FP4 E2M1 codes ``0..7`` are ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, ``8..15`` their negatives (bit 3 = sign). Two codes
  per byte, **element ``2j`` in the low nibble**, ``2j+1`` in the high one (msModelSlim's ``pack_fp4_to_uint8``;
  decoding a real checkpoint that way gives 11 % error against the float weights, the other order 141 %).
* An E8M0 code ``c`` (uint8) is the power of two ``2^(c - 127)``; ``255`` is NaN (rejected when loading).
* MX blocks are 32 consecutive elements along K. A K that is not a multiple of 32 has a shorter last block
  (msModelSlim pads it with zeros: ``weight_scale`` is ``[N, ceil(K / 32)]``).

Two kinds of quantizer live here. The *runtime* ones (:func:`quantize_mx`, :func:`quantize_fp8_per_token`) follow
the format: OCP MX shared exponent ``floor(log2 amax) - emax`` and round-to-nearest-even casts that saturate
(**inferred**: we take these to be ``npu_dynamic_mx_quant``'s defaults, "direct" ``scale_alg=0`` and ``"rint"``;
the documentation we have does not spell them out). The *producer* ones (:func:`quantize_mx_weight`,
:func:`quantize_fp8_weight_per_channel`) reproduce msModelSlim 26.1.0's weight quantizers bit for bit (verified on
its tiny-Qwen3 output: every code and scale equal), rounding rules and working precision included.
"""

from collections.abc import Callable

import torch

from quant_core.primitives import token_amax

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7
# Element formats of the MX schemes: (largest exponent of the element format, largest finite value).
MX_ELEMENTS = {"fp8": (8, FP8_MAX), "fp4": (2, FP4_MAX)}


def mx_blocks(k: int) -> int:
    """Number of 32-element blocks along ``k`` (the last one may be short)."""
    return -(-k // MX_BLOCK)


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` -> ``[..., ceil(K/32), 32]``, zero-padded (zeros change neither a block's amax nor any product)."""
    k = x.shape[-1]
    pad = mx_blocks(k) * MX_BLOCK - k
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, MX_BLOCK)


def _unblocked(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-2], -1)[..., :k]


# --- codecs --------------------------------------------------------------------------------------------------
def encode_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents in ``[-127, 127]`` -> uint8 codes ``e + 127``."""
    return (exponent.to(torch.int32) + E8M0_BIAS).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (any integer dtype, values 0..15) -> float32 values."""
    grid = torch.tensor(FP4_GRID + tuple(-v for v in FP4_GRID), dtype=torch.float32, device=codes.device)
    return grid[codes.to(torch.int64)]


def fp4_codes(values: torch.Tensor) -> torch.Tensor:
    """Values on the E2M1 grid -> uint8 codes; the sign bit follows ``signbit`` (so ``-0.0`` is code 8, as
    msModelSlim writes a negative weight that rounds to zero)."""
    grid = torch.tensor(FP4_GRID, dtype=torch.float32, device=values.device)
    magnitude = torch.bucketize(values.float().abs(), grid)  # exact grid values land on their own index
    return (magnitude + 8 * torch.signbit(values).to(torch.int64)).to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` codes -> uint8 ``[..., K/2]``: element ``2j`` in the low nibble, ``2j+1`` in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packs two codes per byte along K; K={codes.shape[-1]} is odd")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., K/2]`` -> uint8 codes ``[..., K]``."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], -1)


def round_fp8(v: torch.Tensor) -> torch.Tensor:
    """Nearest-even FP8 E4M3 value of ``v`` (float32), saturating at ±448, returned as float32."""
    return v.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def round_fp4(v: torch.Tensor) -> torch.Tensor:
    """Nearest-even FP4 E2M1 value of ``v`` (float32), saturating at ±6. The grid's spacing is 0.5 below 2, 1 up
    to 4 and 2 up to 6, and on each stretch "even code" is "even multiple of the spacing", so rounding ``|v| / step``
    half-to-even is exactly round-to-nearest-even on the grid."""
    v = v.float()
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign((torch.round(a / step) * step).clamp(max=FP4_MAX), v)


# --- runtime activation quantizers ---------------------------------------------------------------------------
def quantize_mx(x: torch.Tensor, element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic MX quantization over the last dim: per 32-block ``e = floor(log2 amax) - emax`` (clamped to
    [-127, 127]; an all-zero block gets -127), elements ``round(x / 2^e)`` to the element format (nearest even,
    saturating). Returns the element values as float32 ``[..., K]`` and ``e`` as int32 ``[..., ceil(K/32)]``."""
    emax, _ = MX_ELEMENTS[element]
    k = x.shape[-1]
    blocks = _blocked(x.float())
    amax = blocks.abs().amax(dim=-1)
    exponent = torch.frexp(amax).exponent - 1 - emax  # frexp: amax = m · 2^E, m in [0.5, 1): floor(log2) = E - 1
    exponent = torch.where(amax > 0, exponent, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = blocks * torch.exp2(-exponent.float())[..., None]  # a power of two: exact
    elements = round_fp8(scaled) if element == "fp8" else round_fp4(scaled)
    return _unblocked(elements, k), exponent


def dequantize_mx(elements: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Element values ``[..., K]`` times ``2^e`` of their block (``exponent [..., ceil(K/32)]``), float32."""
    k = elements.shape[-1]
    return _unblocked(_blocked(elements.float()) * torch.exp2(exponent.float())[..., None], k)


def mx_fake_quant(x: torch.Tensor, element: str) -> torch.Tensor:
    """What the MX matmul sees of ``x``: ``dequantize_mx(*quantize_mx(x))`` (float32)."""
    return dequantize_mx(*quantize_mx(x, element))


def decode_mx_weight(weight: torch.Tensor, scale: torch.Tensor, element: str) -> torch.Tensor:
    """A checkpoint's MX weight (``float8_e4m3fn [N, K]`` or packed FP4 ``uint8 [N, K/2]``) with its E8M0
    ``weight_scale [N, ceil(K/32)]`` -> float32 ``[N, K]``."""
    values = weight.float() if element == "fp8" else fp4_values(unpack_fp4(weight))
    return dequantize_mx(values, scale.to(torch.int32) - E8M0_BIAS)


def quantize_fp8_per_token(
    x: torch.Tensor, amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric FP8 per row: ``s = amax|x| / 448`` (float32 ``[..., 1]``), ``q = fp8(x / s)`` as float32
    values. An all-zero row gets ``s = 0`` and ``q = 0``. ``amax_reduce``: see ``primitives.token_amax``."""
    x32 = x.float()
    scale = token_amax(x32, amax_reduce) / FP8_MAX
    return round_fp8(x32 / torch.where(scale > 0, scale, torch.ones_like(scale))), scale


# --- msModelSlim 26.1.0's weight quantizers ------------------------------------------------------------------
def producer_dtype(weight: torch.Tensor) -> torch.dtype:
    """The precision msModelSlim quantizes a weight in: the model dtype. For float16 we use float32 instead (its
    ``amax / 448`` and ``1e-12`` floor underflow in half precision; msModelSlim was only observed on bf16)."""
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float32) else torch.float32


def quantize_fp8_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``WFP8AFP8_DYNAMIC`` weights as msModelSlim writes them: ``s = max(amax_row, 1e-12) / 448`` and
    ``fp8(clamp(w / s, ±448))``, both computed in the model dtype. Returns float8 ``[N, K]`` and float32 ``[N, 1]``."""
    w = weight.detach().to(producer_dtype(weight))
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.float()


def quantize_mx_weight(weight: torch.Tensor, element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W8A8_MXFP8`` / ``W4A4_MXFP4`` weights as msModelSlim writes them (``ir/api/impl/mx_quantization.py``).

    Shared exponent per 32-block, computed in the model dtype: FP8 ``floor(log2 amax) - 8``; FP4
    ``floor(log2(amax · 8/7 + 9.6e-7)) - 2`` (one higher than OCP's when the block maximum would round above 6).
    Elements in float32, rounded half away from zero on the element grid (FP8 subnormals below 2^-6), saturating.
    Returns (``float8_e4m3fn [N, K]`` or packed FP4 ``uint8 [N, K/2]``, E8M0 ``uint8 [N, ceil(K/32)]``). Exponents
    are clamped to [-127, 127] (msModelSlim lets an FP4 block with amax < 2^-126 wrap around; no real weight has one).
    """
    emax, max_value = MX_ELEMENTS[element]
    k = weight.shape[-1]
    blocks = _blocked(weight.detach().to(producer_dtype(weight)))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if element == "fp8":
        exponent = torch.floor(torch.log2(amax + 2.0**-126 * (amax == 0).to(amax.dtype))) - emax
    else:
        exponent = torch.floor(torch.log2(amax / (1 - 0.5**3) + 9.6e-7)) - emax
    exponent = exponent.float().clamp(-E8M0_BIAS, E8M0_BIAS)
    x = blocks.float() / torch.exp2(exponent)
    if element == "fp8":  # mantissa: 3 bits; private exponent floor(log2|x|), at least -6 (subnormals)
        private = torch.floor(torch.log2(x.abs() + (x == 0).float())).clamp(min=-6)
        step = torch.exp2(private - 3)
    else:  # mantissa: 1 bit; private exponent in [0, 2]
        private = torch.floor(torch.log2(x.abs() + 9.6e-7)).clamp(0, emax)
        step = torch.exp2(private - 1)
    # sign(x) · magnitude: a small negative weight becomes -0.0, FP4 code 8 / FP8 0x80, as msModelSlim writes it
    values = torch.sign(x) * (torch.floor(x.abs() / step + 0.5) * step).clamp(max=max_value)
    values = _unblocked(values, k)
    scale = encode_e8m0(exponent.squeeze(-1))
    if element == "fp8":
        return values.to(torch.float8_e4m3fn), scale
    return pack_fp4(fp4_codes(values)), scale
