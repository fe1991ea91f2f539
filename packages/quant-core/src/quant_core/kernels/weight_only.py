"""Weight-only quantized linear (W8A16, W4A16): int weights dequantized against float activations.

Canonical runtime tensors: ``weight`` int8 ``[N, K]`` (int8 or int4 values, unpacked), ``weight_scale`` and
``weight_offset`` float32 ``[N, G]``, one column per group of ``g = K / G`` inputs (``G = 1``: per channel).
Math (the stored offset is subtracted): ``W[n, k] = (weight[n, k] - offset[n, k // g]) · scale[n, k // g]``,
``y = x Wᵀ + bias``. Kernel options: ``bits`` (8 or 4) says which value range ``weight`` holds.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from quant_core.kernels.base import LinearKernel, LinearKernelConfig
from quant_core.kernels.int8_dynamic import (
    ACL_FORMAT_FRACTAL_NZ,
    exact_int8_gemm,
    fbgemm_available,
    fbgemm_prepack,
    torch_npu_available,
)
from quant_core.primitives import dequantize_weight

INT4PACK_GROUPS = (256, 128, 64, 32)  # the group sizes torch._weight_int4pack_mm_for_cpu accepts


def group_size(config: LinearKernelConfig) -> int:
    """The effective group size ``g``: the scheme's option, with 0 meaning one group spanning K."""
    return config.options.get("group_size", config.group_size) or config.in_features


def _cpu_only(config: LinearKernelConfig) -> tuple[bool, str]:
    return (True, "") if config.device == "cpu" else (False, f"weights are on {config.device}, this kernel is cpu")


class ReferenceWeightOnly(LinearKernel):
    """The spec in plain torch: dequantize with the subtract convention, matmul in float32."""

    name = "reference-weight-only"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize_weight(runtime["weight"], runtime["weight_scale"], runtime["weight_offset"])
        y = x.float() @ w.T
        return y if bias is None else y + bias.float()


class DequantLinear(LinearKernel):
    """CPU fallback: dequantize once at load to a float32 weight, then ``F.linear`` (MKL). fp32 memory."""

    name = "cpu-dequant-linear"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return _cpu_only(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"weight": dequantize_weight(tensors["weight"], tensors["weight_scale"], tensors["weight_offset"])}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.float(), runtime["weight"], None if bias is None else bias.float())


class FbgemmInt8Digits(LinearKernel):
    """fbgemm's int8 GEMM on float activations written as three int8 digits per token: ``x ≈ Σ_d s_d · q_d`` with
    ``s_1 = amax|x| / 127``, ``q_d = round(r_d / s_d)``, ``r_{d+1} = r_d - q_d · s_d`` and ``s_{d+1} = s_d / 254``
    (each remainder is within half a step, so every digit fits [-127, 127]). The three digit rows go through one GEMM
    call (exact int32 sums, :func:`~quant_core.kernels.int8_dynamic.exact_int8_gemm`) and ``y = Σ_d s_d · y_d``.

    The activation error is at most ``s_3 / 2 = amax|x| · 6.1e-8`` per element, fp32's own resolution at the row's
    largest element: float-activation accuracy, unlike the bf16 kernels (``2^-9`` relative). At decode the GEMM is
    weight-bound, so three rows cost about one; from a few dozen tokens it does three rows' arithmetic, which int8
    still does faster than fp32 or bf16 here. Per-channel scales (in the packed weight) and offsets
    (``- Σ_k x[k] · offset[n] · scale[n]``); int8 or int4 values.
    """

    name = "cpu-fbgemm-int8-digits"
    backend = "cpu"
    DIGITS = 3

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if group_size(config) != config.in_features:
            return False, f"per-channel scales only, got groups of {group_size(config)}"
        return fbgemm_available(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        scale, offset = tensors["weight_scale"].flatten().float(), tensors["weight_offset"].flatten().float()
        return {
            "packed_weight": fbgemm_prepack(tensors["weight"], scale),
            "offset_scale": offset * scale if offset.any() else None,
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float()
        digits, scales = int8_digits(x32, self.DIGITS)
        m = x32.shape[0]
        y = exact_int8_gemm(digits, runtime["packed_weight"]).view(self.DIGITS, m, -1).mul_(scales).sum(0)
        if runtime["offset_scale"] is not None:
            y -= x32.sum(-1, keepdim=True) * runtime["offset_scale"]
        return y if bias is None else y.add_(bias)


def int8_digits(x32: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [digits·M, K], scales [digits, M, 1])`` with ``x32 ≈ Σ_d scales[d] · codes[d·M:(d+1)·M]`` (see
    :class:`FbgemmInt8Digits`); all-zero rows get codes 0. Few elementwise passes: at decode they are the cost."""
    m = x32.shape[0]
    first = x32.abs().amax(-1, keepdim=True).div_(127).clamp_min_(torch.finfo(torch.float32).tiny)
    scales = first * DIGIT_STEPS[:digits]
    codes = torch.empty(digits * m, x32.shape[1])
    rest = x32
    for d in range(digits):
        q = torch.div(rest, scales[d], out=codes[d * m : (d + 1) * m]).round_()
        if d + 1 < digits:
            rest = torch.addcmul(rest, q, scales[d], value=-1)
    return codes, scales


DIGIT_STEPS = torch.tensor([1.0, 1 / 254, 1 / 254**2]).view(-1, 1, 1)  # each remainder is within half a step


class Int8PackMM(LinearKernel):
    """``torch._weight_int8pack_mm`` on bf16 activations (the only vectorized dtype on AVX2), for per-channel int8
    (or int4) values.

    It is symmetric: it gets unit scales and the fp32 scale is applied to its output (a bf16 scale
    would add a 2^-9 per-channel error); a non-zero offset is the correction ``- x.sum(-1) ⊗ offset``, since
    ``Σ_k x[k]·(q[n,k] - o[n]) = (x @ qᵀ)[n] - o[n]·Σ_k x[k]``.
    """

    name = "cpu-int8pack-mm"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if group_size(config) != config.in_features:
            return False, f"per-channel scales only, got groups of {group_size(config)}"
        return _cpu_only(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        offset = tensors["weight_offset"].flatten()
        return {
            # a fresh (64-byte aligned) copy: the kernel faults on the arbitrary offsets of safetensors mmaps
            "weight": tensors["weight"].clone(memory_format=torch.contiguous_format),
            "ones": torch.ones(self.config.out_features, dtype=torch.bfloat16),
            "weight_scale": tensors["weight_scale"].flatten(),
            "weight_offset": offset if offset.any() else None,
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xb = x.to(torch.bfloat16).contiguous()
        acc = torch._weight_int8pack_mm(xb, runtime["weight"], runtime["ones"]).float()
        if runtime["weight_offset"] is not None:
            acc -= xb.float().sum(-1, keepdim=True) * runtime["weight_offset"]
        y = acc * runtime["weight_scale"]
        return y if bias is None else y + bias.float()


class Int4PackMM(LinearKernel):
    """``torch._weight_int4pack_mm_for_cpu`` (tinygemm) on bf16 activations.

    It computes ``w = (u - 8) · scale + zero`` with ``u = q + 8`` in 0..15, so ``zero = -offset · scale``.
    ``scalesAndZeros`` is ``[K / gk, N, 2]`` in bf16; a group ``g`` the kernel does not accept is split into
    groups ``gk`` it does (repeating the scale). The packed layout depends on the CPU's ISA, so pack at load.
    """

    name = "cpu-int4pack-mm"
    backend = "cpu"

    @staticmethod
    def kernel_group(g: int) -> int | None:
        return next((gk for gk in INT4PACK_GROUPS if g % gk == 0), None)

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.options.get("bits", 8) != 4:
            return False, "int4 weights only"
        if config.out_features % 16:
            return False, f"N={config.out_features} is not a multiple of 16"
        if cls.kernel_group(group_size(config)) is None:
            return False, f"group size {group_size(config)} is not a multiple of one of {INT4PACK_GROUPS}"
        return _cpu_only(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        gk = self.kernel_group(group_size(self.config))
        repeat = group_size(self.config) // gk
        scale = tensors["weight_scale"].repeat_interleave(repeat, dim=1)
        zero = -tensors["weight_offset"].repeat_interleave(repeat, dim=1) * scale
        u = (tensors["weight"].to(torch.int32) + 8).contiguous()
        return {
            "packed_weight": torch._convert_weight_to_int4pack_for_cpu(u, 1),
            "scales_and_zeros": torch.stack((scale.T, zero.T), dim=-1).to(torch.bfloat16).contiguous(),
            "group": gk,
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), runtime["packed_weight"], runtime["group"], runtime["scales_and_zeros"]
        ).float()
        return y if bias is None else y + bias.float()


class NpuWeightQuantBatchMatmul(LinearKernel):
    """Upstream vllm-ascend's ``npu_weight_quant_batchmatmul`` with the weight ``[K, N]`` (int8 NZ, or int4 packed
    8 per int32 by ``npu_convert_weight_to_int4pack``) and per-channel ``[N]`` / per-group ``[K/g, N]`` scales.

    The op *adds* ``antiquant_offset``, so it gets the negated checkpoint offset. It takes fp16/bf16 activations
    with scales of the same dtype: fp32 inputs run in bf16.
    """

    name = "npu-weight-quant-batchmatmul"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.options.get("bits", 8) == 4 and config.out_features % 8:
            return False, f"N={config.out_features} is not a multiple of 8 (8 int4 per int32 word along N)"
        return torch_npu_available()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        import torch_npu

        weight = tensors["weight"].T.contiguous()
        if self.config.options.get("bits", 8) == 4:
            weight = torch_npu.npu_convert_weight_to_int4pack(weight.to(torch.int32))
        else:
            weight = torch_npu.npu_format_cast(weight, ACL_FORMAT_FRACTAL_NZ)
        scale, offset = tensors["weight_scale"], -tensors["weight_offset"]
        per_channel = scale.shape[1] == 1
        return {
            "weight": weight,
            "antiquant_scale": scale.flatten() if per_channel else scale.T.contiguous(),
            "antiquant_offset": offset.flatten() if per_channel else offset.T.contiguous(),
            "group": 0 if per_channel else group_size(self.config),
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        return torch_npu.npu_weight_quant_batchmatmul(
            x.to(dtype),
            runtime["weight"],
            runtime["antiquant_scale"].to(dtype),
            runtime["antiquant_offset"].to(dtype),
            bias=None if bias is None else bias.to(dtype),
            antiquant_group_size=runtime["group"],
        )


# int4pack first: for per-channel int4 both fit, and it holds half the bytes. int8pack (bf16) where fbgemm is absent.
WEIGHT_ONLY_KERNELS = (
    NpuWeightQuantBatchMatmul, Int4PackMM, FbgemmInt8Digits, Int8PackMM, DequantLinear, ReferenceWeightOnly
)  # fmt: skip
