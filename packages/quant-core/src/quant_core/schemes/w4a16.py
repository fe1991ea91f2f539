"""``W4A16`` linear (msModelSlim v0 dense layout): int4 group-wise asymmetric weights, float activations.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features, ``g`` = the description's
``group_size``, 0 meaning one group spanning K; ``G = K / g``):

=================  ============================================  ==============================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ==============================================
``weight``         int8 ``[N/2, K]``: two int4 per byte along    int8 ``[N, K]`` values in [-8, 7] (npu: int32
                   N (row 2j low nibble, 2j+1 high)              ``[K, N/8]``; cpu: tinygemm-packed
                                                                 ``packed_weight``; fallback: float32 ``[N, K]``)
``weight_scale``   float32 ``[N, G]`` (model dtype accepted)     float32 ``[N, G]`` (npu: ``[G, N]``; cpu:
                                                                 ``scales_and_zeros`` bf16 ``[K/gk, N, 2]``)
``weight_offset``  float32 ``[N, G]``, integer values            float32 ``[N, G]`` (npu: ``-offset``
                                                                 ``[G, N]``, the op adds it)
=================  ============================================  ==============================================

``W[n, k] = (w4[n, k] - weight_offset[n, k // g]) · weight_scale[n, k // g]``, ``y = x Wᵀ + bias``
(modelslim-tool §4.7: subtracting the offset gives 9 % weight error on real output, adding it 74 %).
msModelSlim v1 has no W4A16; v0 wrote ``group_size`` 64.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.moe_npu import NpuGroupedWeightOnlyMoE
from quant_core.kernels.weight_only import WEIGHT_ONLY_KERNELS
from quant_core.primitives import pack_int4_rows, quantize_weight_per_group, unpack_int4_rows
from quant_core.registry import register_scheme
from quant_core.schemes._linear import KernelLinearScheme, check_scale, scale_spec
from quant_core.schemes._moe import ExpertsMoEScheme
from quant_core.spec import TensorSpec

SUGGESTED_GROUPS = (32, 64, 128, 256)  # the group sizes the fast CPU kernel takes


@register_scheme("W4A16", "linear")
class W4A16Linear(KernelLinearScheme):
    quant_type = "W4A16"
    KERNELS = WEIGHT_ONLY_KERNELS

    def check_layout(self, in_features: int, out_features: int, layer: str = "") -> int:
        """The effective group size, or an error saying which group size / shape to use instead."""
        where = f"layer {layer!r}: " if layer else ""
        if out_features % 2:
            raise CheckpointTensorError(
                f"{where}W4A16 packs two int4 output rows per byte, so out_features must be even, got "
                f"{out_features}. Quantize this layer with W8A16 (or leave it FLOAT) instead."
            )
        g = self.group_size or in_features
        if in_features % g:
            fits = [s for s in SUGGESTED_GROUPS if in_features % s == 0]
            raise CheckpointTensorError(
                f"{where}W4A16 group_size {g} does not divide in_features {in_features}. Choose a group_size that "
                f"does: {', '.join(map(str, fits)) + ', or ' if fits else ''}0 (one group per output row)."
            )
        return g

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        k, n = in_features, out_features
        groups = k // self.check_layout(k, n)
        return {
            "weight": TensorSpec(
                "weight", (n // 2, k), torch.int8, output_dim=0, input_dim=1, packed_dim=0, packed_factor=2
            ),
            "weight_scale": scale_spec("weight_scale", (n, groups), output_dim=0, input_dim=1),
            "weight_offset": scale_spec("weight_offset", (n, groups), output_dim=0, input_dim=1),
        }

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor):
        n, k = weight.shape
        q, scale, offset = quantize_weight_per_group(weight, 4, self.check_layout(k, n), symmetric=False)
        return {"weight": pack_int4_rows(q), "weight_scale": scale, "weight_offset": offset}

    def layer_shape(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        packed_rows, k = tensors["weight"].shape
        return k, 2 * packed_rows

    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = ""):
        weight, scale = tensors.get("weight"), tensors.get("weight_scale")
        if weight is not None and weight.dim() == 2:  # the parent reports the other cases
            if scale is not None and scale.dim() == 2 and scale.shape[0] == weight.shape[0]:
                raise CheckpointTensorError(
                    f"tensor {layer + '.' if layer else ''}weight has shape {tuple(weight.shape)}, as many rows as "
                    f"weight_scale: it looks unpacked. W4A16 stores two int4 per byte along N, shape "
                    f"({weight.shape[0] // 2}, {weight.shape[1]}); pack it with quant_core.primitives.pack_int4_rows."
                )
            self.check_layout(*self.layer_shape(tensors), layer)
        return super().process_weights(tensors, layer=layer)

    def kernel_options(self) -> dict[str, Any]:
        return {"bits": 4}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return {
            "weight": unpack_int4_rows(tensors["weight"]),
            "weight_scale": check_scale(tensors["weight_scale"], "weight_scale", layer),
            "weight_offset": check_scale(tensors["weight_offset"], "weight_offset", layer, positive=False),
        }


@register_scheme("W4A16", "moe")
class W4A16MoE(ExpertsMoEScheme):
    """Stacked experts in msModelSlim's dense W4A16 layout: ``w13_weight`` int8 ``[E, I, H]`` (each expert's gate and
    up rows packed two int4 per byte along N), ``w13_weight_scale``/``w13_weight_offset`` float32 ``[E, 2I, H/g]``;
    ``w2_weight`` int8 ``[E, H/2, I]``, ``w2_weight_scale``/``w2_weight_offset`` ``[E, H, I/g]``. Each expert
    projection is the linear scheme above. (Upstream's LLM-Compressor ``weight_packed`` MoE layout is not read.)"""

    quant_type = "W4A16"
    NPU_KERNEL = NpuGroupedWeightOnlyMoE(int4=True)
