"""``W4A4_DYNAMIC`` ("LAOS") linear: int4 per-channel weights, dynamic per-token symmetric int4 activations.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features):

=================  ============================================  ======================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ======================================
``weight``         int8 ``[N, K]``, int4 values in [-8, 7]       int8 ``[N, K]`` (npu: int32 ``[N, K/8]``,
                   (one per byte, not packed)                    8 int4 per word; cpu: fbgemm-packed)
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)   float32 ``[N]``
``weight_offset``  same as ``weight_scale``; zeros; optional     dropped (symmetric: unused)
=================  ============================================  ======================================

``y = s_tok · s_w · (x_q @ W_qᵀ) + bias`` with ``s_tok = amax|x| / 7`` per token and
``x_q = clamp(round(x / s_tok), -8, 7)``. The NPU kernel packs 8 int4 per int32 along K, so it needs
``K % 8 == 0`` (the other backends do not) and, like upstream, computes into float16 before casting to ``x``'s dtype.
"""

from collections.abc import Mapping

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.int4_dynamic import INT4_DYNAMIC_KERNELS
from quant_core.primitives import INT4_RANGE, quantize_weight_per_channel
from quant_core.registry import register_scheme
from quant_core.schemes._linear import KernelLinearScheme
from quant_core.schemes.w8a8_dynamic import int8_weight_specs, symmetric_int8_weight
from quant_core.spec import TensorSpec


def check_int4_values(weight: torch.Tensor, layer: str) -> torch.Tensor:
    """``weight`` unchanged, or an error when it holds values outside [-8, 7] (an int8 or packed-int4 checkpoint)."""
    lo, hi = INT4_RANGE
    if weight.numel() and (weight.min() < lo or weight.max() > hi):
        raise CheckpointTensorError(
            f"tensor {layer + '.' if layer else ''}weight holds values outside the int4 range [{lo}, {hi}] "
            f"(min {int(weight.min())}, max {int(weight.max())}). W4A4 checkpoints store one int4 value per int8 "
            "byte; this looks like an int8 or packed-int4 weight: check the description's quant type."
        )
    return weight


def int4_weight(tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    """Validated int4-valued ``weight`` and flattened float32 ``weight_scale`` (symmetric only)."""
    out = symmetric_int8_weight(tensors, layer)
    check_int4_values(out["weight"], layer)
    return out


@register_scheme("W4A4_DYNAMIC", "linear")
class W4A4DynamicLinear(KernelLinearScheme):
    quant_type = "W4A4_DYNAMIC"
    KERNELS = INT4_DYNAMIC_KERNELS

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        return int8_weight_specs(in_features, out_features)

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor):
        q, scale, offset = quantize_weight_per_channel(weight, bits=4, symmetric=True)
        return {"weight": q, "weight_scale": scale, "weight_offset": offset}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return int4_weight(tensors, layer)
