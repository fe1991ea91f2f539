"""``W8A16`` linear: int8 per-channel weights (with an offset in v0), float activations.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features):

=================  ============================================  ==============================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ==============================================
``weight``         int8 ``[N, K]``                               int8 ``[N, K]`` (npu: ``[K, N]``, NZ;
                                                                 cpu fallback: float32 dequantized ``[N, K]``)
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)   float32 ``[N, 1]`` (npu: ``[N]`` in x's dtype;
                                                                 int8pack: ``[N]``)
``weight_offset``  same as ``weight_scale``; v1 zeros, v0         float32 ``[N, 1]``, zeros when absent (npu:
                   non-zero integers; optional                   ``-offset`` ``[N]``, the op adds it)
=================  ============================================  ==============================================

``W[n, k] = (weight[n, k] - weight_offset[n]) · weight_scale[n]`` (the offset is subtracted), ``y = x Wᵀ + bias``.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.moe_npu import NpuGroupedWeightOnlyMoE
from quant_core.kernels.weight_only import WEIGHT_ONLY_KERNELS
from quant_core.primitives import quantize_weight_per_channel
from quant_core.registry import register_scheme
from quant_core.schemes._linear import KernelLinearScheme, check_scale
from quant_core.schemes._moe import ExpertsMoEScheme
from quant_core.schemes.w8a8_dynamic import int8_weight_specs
from quant_core.spec import TensorSpec


@register_scheme("W8A16", "linear")
class W8A16Linear(KernelLinearScheme):
    quant_type = "W8A16"
    KERNELS = WEIGHT_ONLY_KERNELS

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        return int8_weight_specs(in_features, out_features)

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor):
        q, scale, offset = quantize_weight_per_channel(weight, bits=8, symmetric=True)
        return {"weight": q, "weight_scale": scale, "weight_offset": offset}

    def kernel_options(self) -> dict[str, Any]:
        return {"bits": 8, "group_size": 0}  # per channel whatever the description's global group_size says

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        scale = check_scale(tensors["weight_scale"], "weight_scale", layer)
        offset = tensors.get("weight_offset", torch.zeros_like(scale))  # absent: symmetric
        offset = check_scale(offset, "weight_offset", layer, positive=False)
        return {"weight": tensors["weight"], "weight_scale": scale, "weight_offset": offset}


@register_scheme("W8A16", "moe")
class W8A16MoE(ExpertsMoEScheme):
    """Stacked experts: ``w13_weight`` int8 ``[E, 2I, H]`` with ``w13_weight_scale``/``w13_weight_offset``
    ``[E, 2I, 1]``; ``w2_weight`` int8 ``[E, H, I]`` with ``w2_weight_scale``/``w2_weight_offset`` ``[E, H, 1]``.
    Each expert projection is the linear scheme above; activations stay float."""

    quant_type = "W8A16"
    NPU_KERNEL = NpuGroupedWeightOnlyMoE()
