"""``W8A8_MXFP8`` linear: MXFP8 weights and dynamic MXFP8 activations (FP8 E4M3 elements, one E8M0 exponent per 32).

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features, ``B = ceil(K / 32)``; the
description's global ``group_size`` is 32):

================  ==========================================  ============================================
name              as loaded                                   after ``process_weights``
================  ==========================================  ============================================
``weight``        float8_e4m3fn ``[N, K]``                    float8_e4m3fn ``[N, K]`` (npu: ``[K, N]``
                                                              view; cpu: decoded float32 ``[N, K]``)
``weight_scale``  uint8 ``[N, B]``: E8M0, ``2^(code - 127)``  uint8 ``[N, B]`` (npu: ``[K/64, N, 2]``;
                  per 32-block of a row                       cpu: folded into the float32 weight)
================  ==========================================  ============================================

``W[n, k] = weight[n, k] · 2^(weight_scale[n, k // 32] - 127)``. Activations are quantized the same way per token
and per 32-block at run time (``e = floor(log2 amax) - 8``, nearest-even E4M3, saturating at ±448), and
``y = Σ_blocks (x_e · 2^{e_x}) · (w_e · 2^{e_w}) + bias``. A K that is not a multiple of 32 has a shorter last block
(msModelSlim zero-pads it); the NPU kernel needs ``K % 64 == 0`` (other K run the reference kernel).

``quantize_weights`` reproduces msModelSlim 26.1.0 bit for bit (:func:`quant_core.float_formats.quantize_mx_weight`;
every code and exponent of its tiny-Qwen3 output matched). Decoding that output gives 2.9 % weight error.
"""

from quant_core.registry import register_scheme
from quant_core.schemes._mx import MXLinearScheme


@register_scheme("W8A8_MXFP8", "linear")
class W8A8MXFP8Linear(MXLinearScheme):
    quant_type = "W8A8_MXFP8"
    ELEMENT = "fp8"
