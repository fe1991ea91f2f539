"""``W8A8_DYNAMIC`` linear: int8 per-channel weights, dynamic per-token symmetric int8 activations.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features):

=================  ============================================  ======================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ======================================
``weight``         int8 ``[N, K]``                               int8 ``[N, K]`` (npu: ``[K, N]``, NZ;
                                                                 cpu: fbgemm-packed ``packed_weight``)
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)   float32 ``[N]``
``weight_offset``  same as ``weight_scale``; zeros; optional     dropped (symmetric: unused)
=================  ============================================  ======================================

``y = s_tok · s_w · (x_q @ W_qᵀ) + bias`` with ``s_tok = amax|x| / 127`` per token and ``x_q = round(x / s_tok)``.
"""

from collections.abc import Mapping

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.int8_dynamic import INT8_DYNAMIC_KERNELS
from quant_core.kernels.moe_npu import NpuGroupedDynamicMoE
from quant_core.primitives import quantize_weight_per_channel
from quant_core.registry import register_scheme
from quant_core.schemes._linear import KernelLinearScheme, check_scale, scale_spec
from quant_core.schemes._moe import ExpertsMoEScheme
from quant_core.spec import TensorSpec


def int8_weight_specs(in_features: int, out_features: int) -> dict[str, TensorSpec]:
    """``weight`` int8 ``[N, K]`` with per-channel ``weight_scale`` / ``weight_offset`` ``[N, 1]``."""
    n, k = out_features, in_features
    return {
        "weight": TensorSpec("weight", (n, k), torch.int8, output_dim=0, input_dim=1),
        "weight_scale": scale_spec("weight_scale", (n, 1), output_dim=0),
        "weight_offset": scale_spec("weight_offset", (n, 1), output_dim=0, optional=True),
    }


def symmetric_int8_weight(tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    """Validated ``weight`` and flattened float32 ``weight_scale``; a non-zero offset is refused (symmetric only)."""
    offset = tensors.get("weight_offset")
    if offset is not None and check_scale(offset, "weight_offset", layer, positive=False).any():
        raise CheckpointTensorError(
            f"tensor {layer + '.' if layer else ''}weight_offset is non-zero, but per-token int8 schemes use "
            "symmetric weights (msModelSlim writes zeros). The description's quant type is probably wrong."
        )
    return {
        "weight": tensors["weight"],
        "weight_scale": check_scale(tensors["weight_scale"], "weight_scale", layer).flatten(),
    }


@register_scheme("W8A8_DYNAMIC", "linear")
class W8A8DynamicLinear(KernelLinearScheme):
    quant_type = "W8A8_DYNAMIC"
    KERNELS = INT8_DYNAMIC_KERNELS

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        return int8_weight_specs(in_features, out_features)

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor):
        q, scale, offset = quantize_weight_per_channel(weight, bits=8, symmetric=True)
        return {"weight": q, "weight_scale": scale, "weight_offset": offset}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return symmetric_int8_weight(tensors, layer)


@register_scheme("W8A8_DYNAMIC", "moe")
class W8A8DynamicMoE(ExpertsMoEScheme):
    """Stacked experts: ``w13_weight`` int8 ``[E, 2I, H]``, ``w13_weight_scale``/``w13_weight_offset`` ``[E, 2I, 1]``,
    ``w2_weight`` int8 ``[E, H, I]``, ``w2_weight_scale``/``w2_weight_offset`` ``[E, H, 1]``; each expert projection
    processed and applied as the linear scheme above (format §8.3-8.4: per-token int8 x, gmm1, SwiGLU, per-token int8
    requant, gmm2)."""

    quant_type = "W8A8_DYNAMIC"
    NPU_KERNEL = NpuGroupedDynamicMoE()
