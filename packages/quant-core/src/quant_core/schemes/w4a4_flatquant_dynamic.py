"""``W4A4_FLATQUANT_DYNAMIC`` linear: a per-token Kronecker transform, then int4 activations × int4 weights.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features, ``(L, R) = get_decompose_dim(K)``
unless the checkpoint says otherwise, see ``_flatquant.py``):

=================  ============================================  ======================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ======================================
``weight``         int8 ``[N, K]``, int4 values in [-8, 7]       int8 ``[N, K]`` (npu: int32 ``[N, K/8]``;
                   (one per byte, not packed)                    cpu: fbgemm-packed ``packed_weight``)
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)   float32 ``[N]``
``weight_offset``  same as ``weight_scale``; zeros; optional     dropped (symmetric: unused)
``left_trans``     float32 ``[L, L]`` (msModelSlim) or model     float32 ``[L, L]`` (npu: transposed, as
                   dtype (upstream's params_dtype)               ``npu_kronecker_quant`` wants it)
``right_trans``    as ``left_trans``, ``[R, R]``; required       float32 ``[R, R]``
``clip_ratio``     float32 ``[1]``                               Python float
=================  ============================================  ======================================

Per token: ``X̃ = left_transᵀ · X · right_trans`` on ``X = x.view(L, R)``; ``s_tok = clip_ratio · amax|X̃| / 7``;
``q = clamp(round(X̃ / s_tok), -8, 7)``; ``y = s_tok · s_w · (q @ W_qᵀ) + bias``. The NPU kernel needs
``K % 8 == 0`` and ``R % 8 == 0`` (``npu_kronecker_quant`` packs 8 int4 per int32 along R); reference and cpu
serve any shape.
"""

from collections.abc import Mapping

import torch

from quant_core.kernels.flatquant import FLATQUANT_INT4_KERNELS
from quant_core.primitives import quantize_weight_per_channel
from quant_core.registry import register_scheme
from quant_core.schemes._flatquant import FlatQuantLinear
from quant_core.schemes.w4a4_dynamic import int4_weight
from quant_core.schemes.w8a8_dynamic import int8_weight_specs
from quant_core.spec import TensorSpec


@register_scheme("W4A4_FLATQUANT_DYNAMIC", "linear")
class W4A4FlatQuantDynamicLinear(FlatQuantLinear):
    quant_type = "W4A4_FLATQUANT_DYNAMIC"
    KERNELS = FLATQUANT_INT4_KERNELS
    right_trans_optional = False
    uses_clip_ratio = True

    def inner_specs(self, in_features: int, out_features: int) -> dict[str, TensorSpec]:
        return int8_weight_specs(in_features, out_features)

    def quantize_inner(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, offset = quantize_weight_per_channel(weight, bits=4, symmetric=True)
        return {"weight": q, "weight_scale": scale, "weight_offset": offset}

    def canonicalize_inner(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return int4_weight(tensors, layer)
