"""W4A8_DYNAMIC kernels: int4 weights, in two forms.

Per-channel (``group_size == 0``): canonical ``weight`` int8 ``[N, K]`` (int4 values), ``weight_scale`` float32
``[N]``; the math is W8A8_DYNAMIC's with int4-valued weights, so reference and cpu are the INT8_DYNAMIC kernels.

Per-group, two-step (``group_size = g > 0``): canonical ``weight`` int8 ``[N, K]`` (int4 values), ``weight_scale``
float32 ``[N]``, ``weight_scale_second`` float32 ``[N, K/g]``. Activations stay float (A16 compute):
``y = x · Wᵀ + bias`` with ``W[n, k] = w4[n, k] · weight_scale_second[n, k // g] · weight_scale[n]``.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from quant_core.kernels.base import LinearKernel, LinearKernelConfig
from quant_core.kernels.int8_dynamic import (
    FbgemmInt8DynamicInt4Weights,
    NpuInt8Dynamic,
    ReferenceInt8Dynamic,
    torch_npu_available,
)

CPU_INT4PACK_GROUPS = (32, 64, 128, 256)


def npu_int4_words(weight: torch.Tensor) -> torch.Tensor:
    """int4 values ``[N, K]`` -> int32 ``[K, N/8]`` (8 per word along N), the layout the NPU matmuls take."""
    import torch_npu

    return torch_npu.npu_convert_weight_to_int4pack(weight.T.contiguous().to(torch.int32))


# --- per-channel ---------------------------------------------------------------------------------------------
class NpuW4A8Dynamic(NpuInt8Dynamic):
    """:class:`NpuInt8Dynamic`'s calls with the int4 weight packed into int32 words ``[K, N/8]``.
    Layers with ``N % 8 != 0`` fall back to :class:`NpuInt8Dynamic` itself (int4 values in int8: same result)."""

    name = "npu-w4a8-dynamic"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.out_features % 8:
            return False, f"int4 words hold 8 outputs; N={config.out_features} is not a multiple of 8"
        return torch_npu_available()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"weight": npu_int4_words(tensors["weight"]), "weight_scale": tensors["weight_scale"]}


W4A8_CHANNEL_KERNELS = (NpuW4A8Dynamic, NpuInt8Dynamic, FbgemmInt8DynamicInt4Weights, ReferenceInt8Dynamic)


# --- per-group (two-step, A16 compute) -----------------------------------------------------------------------
def dequantize_two_step(tensors: Mapping[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """float32 ``[N, K]``: ``w4 · weight_scale_second[n, k // g] · weight_scale[n]``."""
    scale = tensors["weight_scale_second"] * tensors["weight_scale"][:, None]
    return tensors["weight"].float() * scale.repeat_interleave(group_size, dim=1)


class ReferenceW4Group(LinearKernel):
    """The spec in plain torch: dequantize, float32 matmul."""

    name = "reference-w4-group"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x.float() @ dequantize_two_step(runtime, self.config.group_size).T
        return y if bias is None else y + bias.float()


class CpuInt4PackW4Group(LinearKernel):
    """``torch._weight_int4pack_mm_for_cpu`` (vectorized only for bf16 activations on AVX2, ``cpu-kernels.md`` §4).
    tinygemm dequantizes ``(q - 8) · scale + zero``: stored ``q = w4 + 8``, ``scale = s · s2``, ``zero = 0``.
    The combined scale and the activations are rounded to bf16 (≈2^-9 relative each)."""

    name = "cpu-int4pack-w4-group"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.device != "cpu":
            return False, f"weights are on {config.device}, the int4pack kernel runs on cpu"
        if config.out_features % 16:
            return False, f"needs N % 16 == 0, got N={config.out_features}"
        if config.group_size not in CPU_INT4PACK_GROUPS:
            return False, f"needs group_size in {CPU_INT4PACK_GROUPS}, got {config.group_size}"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        packed = torch._convert_weight_to_int4pack_for_cpu(tensors["weight"].to(torch.int32) + 8, 1)
        scale = (tensors["weight_scale_second"] * tensors["weight_scale"][:, None]).T  # [K/g, N]
        scales_and_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1).to(torch.bfloat16).contiguous()
        return {"packed_weight": packed, "scales_and_zeros": scales_and_zeros}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), runtime["packed_weight"], self.config.group_size, runtime["scales_and_zeros"]
        )
        return y if bias is None else y.float() + bias.float()


class CpuDequantW4Group(LinearKernel):
    """Any shape: dequantize once to float32, then ``F.linear`` (fp32 MKL; 4 bytes/weight of memory)."""

    name = "cpu-dequant-w4-group"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.device != "cpu":
            return False, f"weights are on {config.device}, this kernel runs on cpu"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"weight": dequantize_two_step(tensors, self.config.group_size)}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.float(), runtime["weight"], None if bias is None else bias.float())


class NpuW4Group(LinearKernel):
    """Historical upstream call: ``npu_weight_quant_batchmatmul`` with ``antiquant_scale = S [K/g, N]``,
    ``S = weight_scale · weight_scale_second``; the weight is int4 words ``[K, N/8]`` when ``N % 8 == 0``, else
    int8 ``[K, N]`` (the op takes both)."""

    name = "npu-w4-group-antiquant"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return torch_npu_available()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        w = tensors["weight"]
        weight = npu_int4_words(w) if w.shape[0] % 8 == 0 else w.T.contiguous()
        scale = (tensors["weight_scale_second"] * tensors["weight_scale"][:, None]).T.contiguous()
        return {"weight": weight, "antiquant_scale": scale}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        return torch_npu.npu_weight_quant_batchmatmul(
            x,
            runtime["weight"],
            antiquant_scale=runtime["antiquant_scale"].to(x.dtype),
            antiquant_group_size=self.config.group_size,
            bias=bias,
        )


W4_GROUP_KERNELS = (NpuW4Group, CpuInt4PackW4Group, CpuDequantW4Group, ReferenceW4Group)
