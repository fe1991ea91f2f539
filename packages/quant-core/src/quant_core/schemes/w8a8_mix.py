"""``W8A8_MIX`` linear: one checkpoint that serves static ``W8A8`` on decode instances and ``W8A8_DYNAMIC`` elsewhere.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features): the ``W8A8`` set of
``schemes/w8a8.py`` plus a required per-channel weight scale:

=================  ==============================================  ======================================
name               as loaded                                       after ``process_weights``
=================  ==============================================  ======================================
``weight``         int8 ``[N, K]``                                 int8 ``[N, K]`` (npu: ``[K, N]``, NZ;
                                                                   cpu: fbgemm-packed ``packed_weight``)
``input_scale``    float32 ``[1]`` (v1) or model dtype (v0)        static: float32 ``[1]``; dynamic: dropped
``input_offset``   as ``input_scale``; an integer in [-128, 127]   static: float32 ``[1]``; dynamic: dropped
``quant_bias``     int32 ``[N]``                                   static: int32 ``[N]``; dynamic: dropped
``deq_scale``      float32 ``[N]`` or int64 ``[N]`` (fp16 models)  static: float32 ``[N]``; dynamic: dropped
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)     dynamic: float32 ``[N]``; static: dropped
``weight_offset``  as ``weight_scale``; zeros; optional            dropped (must be zero)
=================  ==============================================  ======================================

Every tensor is validated in both modes (prefill and decode nodes load the same files).

Scheme option ``mode``:

* ``"dynamic"`` (default; prefill or colocated instances): the ``W8A8_DYNAMIC`` formula
  ``y = s_tok · s_w · (x_q @ W_qᵀ) + bias`` with per-token ``x_q``; ``deq_scale`` / ``quant_bias`` are unused and
  **the float layer bias is added**.
* ``"static"`` (decode / KV-consumer instances): the ``W8A8`` formula
  ``y = (clamp(round(x / input_scale + input_offset)) @ W_qᵀ + quant_bias) · deq_scale``; **the float layer bias
  is NOT added** (msModelSlim folded it into ``quant_bias``).

``quantize_weights(weight, bias=None, **calibration)`` writes both sets (calibration as for ``W8A8``).
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.int8_dynamic import INT8_DYNAMIC_KERNELS
from quant_core.kernels.int8_static import INT8_STATIC_KERNELS
from quant_core.registry import register_scheme
from quant_core.schemes._linear import KernelLinearScheme
from quant_core.schemes.w8a8 import quantize_static_linear, static_int8_specs, static_int8_tensors
from quant_core.schemes.w8a8_dynamic import int8_weight_specs, symmetric_int8_weight
from quant_core.spec import TensorSpec

MODES = ("dynamic", "static")


@register_scheme("W8A8_MIX", "linear")
class W8A8MixLinear(KernelLinearScheme):
    quant_type = "W8A8_MIX"
    KERNELS = INT8_DYNAMIC_KERNELS

    def __init__(self, *, mode: str = "dynamic", **options: Any) -> None:
        super().__init__(**options)
        if mode not in MODES:
            raise ValueError(
                f"W8A8_MIX mode must be 'dynamic' (prefill/colocated instances) or 'static' (decode/KV-consumer "
                f"instances), got {mode!r}"
            )
        self.mode = mode
        self.KERNELS = INT8_STATIC_KERNELS if mode == "static" else INT8_DYNAMIC_KERNELS

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, version={self.version!r}, mode={self.mode!r})"

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        return {
            **static_int8_specs(in_features, out_features, params_dtype),
            **int8_weight_specs(in_features, out_features),
        }

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: Any):
        tensors, s_w = quantize_static_linear(weight, bias, calibration)
        return {**tensors, "weight_scale": s_w, "weight_offset": torch.zeros_like(s_w)}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        static = static_int8_tensors(tensors, layer)
        dynamic = symmetric_int8_weight(tensors, layer)
        return static if self.mode == "static" else dynamic
