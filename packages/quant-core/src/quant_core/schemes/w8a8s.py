"""``W8A8S`` linear (310P "sparse" W8A8): the static ``W8A8`` computation on int8 weights whose values may span
fewer than 8 bits (ready for msModelSlim's separate weight-compression step, ``W8A8SC``, which does not run on CPU).

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features), as msModelSlim 26.1.0's v0
pipeline writes them (``modelslim-tool.md`` §4.4):

=================  ==============================================  ======================================
name               as loaded                                       after ``process_weights``
=================  ==============================================  ======================================
``weight``         int8 ``[N, K]`` (msModelSlim: values in about   int8 ``[N, K]`` (npu: ``[K, N]``, NZ;
                   ±12, 15 % zeros)                                cpu: fbgemm-packed ``packed_weight``)
``input_scale``    model dtype ``[1]`` (v0) or float32             float32 ``[1]`` (npu: reciprocal ``[K]``)
``input_offset``   as ``input_scale``; an integer in [-128, 127]   float32 ``[1]`` (npu: repeated to ``[K]``)
``quant_bias``     int32 ``[N]``                                   int32 ``[N]`` (cpu: folded into a float
                                                                   bias ``quant_bias · deq_scale``)
``deq_scale``      float32 ``[N]``, or int64 ``[N]`` holding       float32 ``[N]``
                   float32 bits (fp16 models; always on 310P)
``weight_scale``,  not written by msModelSlim for W8A8S; accepted  dropped
``weight_offset``  (``[N, 1]``, unused) as for ``W8A8``
=================  ==============================================  ======================================

``x_q = clamp(round(x / input_scale + input_offset), -128, 127)``, ``y = (x_q @ W_qᵀ + quant_bias) · deq_scale``;
the float layer bias is not added (folded into ``quant_bias``). The kernels are W8A8's (``kernels/int8_static.py``):
the arithmetic is identical, only the weights' value range differs.

``quantize_weights`` takes the same calibration as ``W8A8`` and writes full-range int8 per-channel weights: a valid
W8A8S layer, more accurate than msModelSlim's low-bit grid (its tiny-Qwen3 output has 10.6 % weight error against
the float weights; int8 per channel about 0.8 %), but not pre-shaped for sparse compression.
"""

from quant_core.registry import register_scheme
from quant_core.schemes.w8a8 import W8A8Linear


@register_scheme("W8A8S", "linear")
class W8A8SLinear(W8A8Linear):
    quant_type = "W8A8S"
