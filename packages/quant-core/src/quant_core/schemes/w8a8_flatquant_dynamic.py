"""``W8A8_FLATQUANT_DYNAMIC`` linear (msModelSlim v1 FlatQuant + W8A8_DYNAMIC): a per-token Kronecker transform,
then W8A8_DYNAMIC's per-token int8 activations × per-channel int8 weights.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features; ``a · b = K``, by default
``(a, b) = get_decompose_dim(K)``, but read off the checkpoint, see ``_flatquant.py``):

=================  ============================================  ======================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ======================================
``weight``         int8 ``[N, K]``                               int8 ``[N, K]`` (npu: ``[K, N]``, NZ;
                                                                 cpu: fbgemm-packed ``packed_weight``)
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)   float32 ``[N]``
``weight_offset``  same as ``weight_scale``; zeros; optional     dropped (symmetric: unused)
``left_trans``     float32 ``[a, a]`` (or model dtype); o_proj:  float32 ``[a, a]``
                   ``[heads, heads]``
``right_trans``    as ``left_trans``, ``[b, b]``; not on o_proj  float32 ``[b, b]`` (absent: identity)
``clip_ratio``     float32 ``[1]`` (or model dtype)              validated (> 0), not used
=================  ============================================  ======================================

Per token: ``X̃ = left_transᵀ · X · right_trans`` on ``X = x.view(a, b)`` (verified on msModelSlim output,
modelslim-tool.md §5), then ``y = s_tok · s_w · (round(x̃ / s_tok) @ W_qᵀ) + bias`` with ``s_tok = amax|x̃| / 127``.
``clip_ratio`` does not scale the int8 range: msModelSlim's verification (0.9 % error on q_proj) used plain
per-token int8, which is what its ``linear_quant`` (per-token min/max) calibrated, and ``npu_dynamic_quant`` has
no clip argument.
"""

from collections.abc import Mapping

import torch

from quant_core.kernels.flatquant import FLATQUANT_INT8_KERNELS
from quant_core.primitives import quantize_weight_per_channel
from quant_core.registry import register_scheme
from quant_core.schemes._flatquant import FlatQuantLinear
from quant_core.schemes.w8a8_dynamic import int8_weight_specs, symmetric_int8_weight
from quant_core.spec import TensorSpec


@register_scheme("W8A8_FLATQUANT_DYNAMIC", "linear")
class W8A8FlatQuantDynamicLinear(FlatQuantLinear):
    quant_type = "W8A8_FLATQUANT_DYNAMIC"
    KERNELS = FLATQUANT_INT8_KERNELS

    def inner_specs(self, in_features: int, out_features: int) -> dict[str, TensorSpec]:
        return int8_weight_specs(in_features, out_features)

    def quantize_inner(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, offset = quantize_weight_per_channel(weight, bits=8, symmetric=True)
        return {"weight": q, "weight_scale": scale, "weight_offset": offset}

    def canonicalize_inner(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return symmetric_int8_weight(tensors, layer)
