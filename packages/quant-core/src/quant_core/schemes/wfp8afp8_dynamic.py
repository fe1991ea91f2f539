"""``WFP8AFP8_DYNAMIC`` linear (upstream vllm-ascend: ``W8A8FP8_DYNAMIC``): FP8 E4M3 per-channel weights, dynamic
per-token FP8 activations. Both names are registered; they differ only in the ``quant_type`` they report.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features):

=================  ============================================  ======================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ======================================
``weight``         float8_e4m3fn ``[N, K]``                      float8_e4m3fn ``[N, K]`` (npu: ``[K, N]``;
                                                                 cpu: float32 ``weight · weight_scale``)
``weight_scale``   float32 ``[N, 1]`` (model dtype accepted)     float32 ``[N]`` (cpu: folded into the weight)
``weight_offset``  float32 ``[N, 1]``; zeros; optional           dropped (symmetric: unused)
=================  ============================================  ======================================

``y = s_tok · s_w · (x_q @ W_qᵀ) + bias`` with ``s_tok = amax|x| / 448`` per token and ``x_q = fp8(x / s_tok)``
(nearest even, saturating). ``quantize_weights`` reproduces msModelSlim 26.1.0 bit for bit:
``s_w = max(amax_row, 1e-12) / 448`` and ``fp8(clamp(w / s_w, ±448))`` in the model dtype (every code and scale of
its tiny-Qwen3 output matched).
"""

from collections.abc import Mapping

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.float_formats import quantize_fp8_weight_per_channel
from quant_core.kernels.fp8_dynamic import FP8_DYNAMIC_KERNELS
from quant_core.registry import register_scheme
from quant_core.schemes._linear import KernelLinearScheme, check_scale, scale_spec
from quant_core.schemes._mx import check_fp8_finite
from quant_core.spec import TensorSpec


@register_scheme("WFP8AFP8_DYNAMIC", "linear")
class WFP8AFP8DynamicLinear(KernelLinearScheme):
    quant_type = "WFP8AFP8_DYNAMIC"
    KERNELS = FP8_DYNAMIC_KERNELS

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        n, k = out_features, in_features
        return {
            "weight": TensorSpec("weight", (n, k), torch.float8_e4m3fn, output_dim=0, input_dim=1),
            "weight_scale": scale_spec("weight_scale", (n, 1), output_dim=0),
            "weight_offset": scale_spec("weight_offset", (n, 1), output_dim=0, optional=True),
        }

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor):
        q, scale = quantize_fp8_weight_per_channel(weight)
        return {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        offset = tensors.get("weight_offset")
        if offset is not None and check_scale(offset, "weight_offset", layer, positive=False).any():
            raise CheckpointTensorError(
                f"tensor {layer + '.' if layer else ''}weight_offset is non-zero, but FP8 weights are symmetric "
                "(msModelSlim writes zeros). The description's quant type is probably wrong."
            )
        return {
            "weight": check_fp8_finite(tensors["weight"], layer),
            "weight_scale": check_scale(tensors["weight_scale"], "weight_scale", layer).flatten(),
        }


@register_scheme("W8A8FP8_DYNAMIC", "linear")
class W8A8FP8DynamicLinear(WFP8AFP8DynamicLinear):
    """The same scheme under upstream vllm-ascend's name."""

    quant_type = "W8A8FP8_DYNAMIC"
