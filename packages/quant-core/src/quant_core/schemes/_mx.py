"""What the MX linear schemes (``W8A8_MXFP8``, ``W4A4_MXFP4``) share: specs, validation, msModelSlim's quantizer.

A scheme sets ``quant_type`` and ``ELEMENT`` (``"fp8"`` or ``"fp4"``); the block size is fixed at 32 along K, so
the description's ``group_size`` must be 32 (what msModelSlim writes) or 0 / absent.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from quant_core.errors import CheckpointTensorError, DescriptionError
from quant_core.float_formats import E8M0_NAN, MX_BLOCK, mx_blocks, quantize_mx_weight
from quant_core.kernels.mx import MX_KERNELS
from quant_core.schemes._linear import KernelLinearScheme
from quant_core.spec import TensorSpec


def check_fp8_finite(weight: torch.Tensor, layer: str) -> torch.Tensor:
    """``weight`` unchanged, or an error when it holds FP8 NaN codes (E4M3FN has no infinities)."""
    if torch.isnan(weight.float()).any():
        raise CheckpointTensorError(
            f"tensor {layer + '.' if layer else ''}weight holds {int(torch.isnan(weight.float()).sum())} FP8 NaN "
            "value(s); the checkpoint is corrupted or was quantized from a diverged model. Re-quantize the layer."
        )
    return weight


class MXLinearScheme(KernelLinearScheme):
    ELEMENT: ClassVar[str]
    KERNELS = MX_KERNELS
    FIXED_GROUP_SIZE: ClassVar[int] = MX_BLOCK  # the quantizer writes it as the description's group_size

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.group_size not in (0, MX_BLOCK):
            raise DescriptionError(
                f"{self.quant_type} uses blocks of {MX_BLOCK} along K, but the description's group_size is "
                f"{self.group_size}. msModelSlim writes group_size {MX_BLOCK} for MX checkpoints: fix the global key "
                "in quant_model_description.json (a checkpoint cannot mix MX layers with W4A16 / W4A8 group sizes)."
            )

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        n, k = out_features, in_features
        if self.ELEMENT == "fp8":
            weight = TensorSpec("weight", (n, k), torch.float8_e4m3fn, output_dim=0, input_dim=1)
        elif k % 2:
            raise CheckpointTensorError(
                f"{self.quant_type} packs two FP4 values per byte along K, so in_features must be even, got {k}. "
                "Quantize this layer with W8A8_MXFP8 (or leave it FLOAT) instead."
            )
        else:
            weight = TensorSpec("weight", (n, k // 2), torch.uint8, output_dim=0, input_dim=1, packed_dim=1,
                                packed_factor=2)  # fmt: skip
        return {
            "weight": weight,
            "weight_scale": TensorSpec("weight_scale", (n, mx_blocks(k)), torch.uint8, output_dim=0, input_dim=1),
        }

    def layer_shape(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        n, k = tensors["weight"].shape
        return (k if self.ELEMENT == "fp8" else 2 * k), n

    def kernel_options(self) -> dict[str, Any]:
        return {"element": self.ELEMENT}

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor):
        self.weight_specs(weight.shape[1], weight.shape[0], weight.dtype)  # rejects an odd K for FP4
        q, scale = quantize_mx_weight(weight, self.ELEMENT)
        return {"weight": q, "weight_scale": scale}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        scale = tensors["weight_scale"]
        bad = int((scale == E8M0_NAN).sum())
        if bad:
            raise CheckpointTensorError(
                f"tensor {layer + '.' if layer else ''}weight_scale has {bad} E8M0 NaN code(s) (255); every block "
                "exponent must be 0..254 (2^(code - 127)). The checkpoint is corrupted: re-quantize the layer."
            )
        weight = tensors["weight"]
        if self.ELEMENT == "fp8":
            check_fp8_finite(weight, layer)
        return {"weight": weight, "weight_scale": scale}
