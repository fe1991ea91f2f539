"""``W4A4_MXFP4`` linear: MXFP4 weights and dynamic MXFP4 activations (FP4 E2M1 elements, one E8M0 exponent per 32).

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, even; ``N`` = out_features, ``B = ceil(K / 32)``; the
description's global ``group_size`` is 32):

================  ==========================================  ============================================
name              as loaded                                   after ``process_weights``
================  ==========================================  ============================================
``weight``        uint8 ``[N, K/2]``: two E2M1 codes per      uint8 ``[N, K/2]`` (npu: ``[K/2, N]`` view,
                  byte along K, element 2j in the low         still packed along K; cpu: decoded float32
                  nibble, 2j+1 in the high nibble             ``[N, K]``)
``weight_scale``  uint8 ``[N, B]``: E8M0, ``2^(code - 127)``  uint8 ``[N, B]`` (npu: ``[K/64, N, 2]``;
                  per 32-block of a row                       cpu: folded into the float32 weight)
================  ==========================================  ============================================

E2M1 codes 0..7 are ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, 8..15 their negatives, and
``W[n, k] = value(code[n, k]) · 2^(weight_scale[n, k // 32] - 127)``. The nibble order is msModelSlim's
(``pack_fp4_to_uint8``: low nibble first); decoding its output that way gives 11 % weight error against the float
weights, the other way 141 %. Activations are quantized per token and per 32-block at run time (OCP
``e = floor(log2 amax) - 2``, nearest-even E2M1, saturating at ±6), and
``y = Σ_blocks (x_e · 2^{e_x}) · (w_e · 2^{e_w}) + bias``. A K that is not a multiple of 32 has a shorter last block;
the NPU kernel needs ``K % 64 == 0`` (other K run the reference kernel).

``quantize_weights`` reproduces msModelSlim 26.1.0 bit for bit (its FP4 exponent is ``floor(log2(amax · 8/7)) - 2``,
one above OCP's when the block maximum would round beyond 6; see
:func:`quant_core.float_formats.quantize_mx_weight`).
"""

from quant_core.registry import register_scheme
from quant_core.schemes._mx import MXLinearScheme


@register_scheme("W4A4_MXFP4", "linear")
class W4A4MXFP4Linear(MXLinearScheme):
    quant_type = "W4A4_MXFP4"
    ELEMENT = "fp4"
