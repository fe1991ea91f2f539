"""Microscaling (MX) activations × MX weights: W8A8_MXFP8 (FP8 E4M3 elements) and W4A4_MXFP4 (FP4 E2M1).

Canonical runtime tensors: ``weight`` ``float8_e4m3fn [N, K]`` (fp8) or packed FP4 ``uint8 [N, K/2]`` (fp4, element
``2j`` in the low nibble), ``weight_scale`` E8M0 ``uint8 [N, ceil(K/32)]``; ``config.options["element"]`` says which.
Math (``modelslim-format.md`` §6.3): per token and per 32-block of K, ``x ≈ x_e · 2^{e_x}`` with
``e_x = floor(log2 amax) - emax`` and ``x_e`` the nearest-even element (see :func:`quantize_mx`); then
``y = Σ_blocks (x_e · 2^{e_x}) · (w_e · 2^{e_w}) + bias``.

There is no MX (or FP8) GEMM on x86 CPUs in torch 2.13: ``torch._scaled_mm`` runs FP8 on CPU 2-70x slower than
float32 ``F.linear`` (K=N=2048, M=1..128, 2 threads, measured). The CPU kernel therefore decodes the weight once, to
float32 (exact: every MX weight value is a float32), and runs MKL's float32 GEMM on the MX-rounded activations: the
same numbers as the reference up to summation order, at ``F.linear`` speed, for 4 bytes per weight of memory.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from quant_core.float_formats import MX_BLOCK, decode_mx_weight, mx_fake_quant
from quant_core.kernels.base import LinearKernel, LinearKernelConfig
from quant_core.kernels.int8_dynamic import torch_npu_available

NPU_GROUP_SIZES = [1, 1, MX_BLOCK]  # npu_quant_matmul's (M, N, K) group sizes: one scale per 32 along K


def element(config: LinearKernelConfig) -> str:
    return config.options["element"]


class ReferenceMX(LinearKernel):
    """The spec in plain torch: decode the checkpoint's codes and exponents on every call, float32 matmul of the
    (exactly representable) MX values."""

    name = "reference-mx"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kind = element(self.config)
        w = decode_mx_weight(runtime["weight"], runtime["weight_scale"], kind)
        y = mx_fake_quant(x, kind) @ w.T
        return y if bias is None else y + bias.float()


class CpuMX(LinearKernel):
    """The weight decoded once to float32, MX-rounded activations, ``F.linear`` (module docstring)."""

    name = "cpu-mx-dequantized-fp32"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.device != "cpu":
            return False, f"weights are on {config.device}, this kernel runs on cpu"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"weight": decode_mx_weight(tensors["weight"], tensors["weight_scale"], element(self.config))}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(
            mx_fake_quant(x, element(self.config)), runtime["weight"], None if bias is None else bias.float()
        )


class NpuMX(LinearKernel):
    """Upstream vllm-ascend's A5 calls: ``npu_dynamic_mx_quant`` on the activations, then ``npu_quant_matmul`` in MX
    mode (E8M0 scales for both operands, ``group_sizes=[1, 1, 32]``; FP4 operands flagged ``float4_e2m1fn_x2``).

    Layouts: the weight as a transposed view (``[K, N]`` fp8; ``[K/2, N]`` for FP4, still packed along K, as the
    W4A4 FlatQuant path passes its packed weight), and ``weight_scale`` ``[N, K/32]`` regrouped in pairs and
    transposed to ``[K/64, N, 2]``, the layout ``npu_dynamic_mx_quant`` returns for activations. Pairing needs
    ``K % 64 == 0``, as upstream's reshape does; other K fall back to the reference kernel. **(inferred)**: the
    transposed views and the paired layout of the weight scale follow upstream's processing as we read it; they are
    checked on the emulator only.
    """

    name = "npu-mx"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        ok, why = torch_npu_available()
        if ok and config.in_features % (2 * MX_BLOCK):
            return False, (
                f"the NPU reads MX scales in pairs ([K/64, N, 2]); K={config.in_features} is not a multiple of 64"
            )
        return ok, why

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        n, blocks = tensors["weight_scale"].shape
        scale = tensors["weight_scale"].reshape(n, blocks // 2, 2).transpose(0, 1).contiguous()
        return {"weight": tensors["weight"].t(), "weight_scale": scale}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        fp4 = element(self.config) == "fp4"
        dst = torch_npu.float4_e2m1fn_x2 if fp4 else torch.float8_e4m3fn
        x_q, x_scale = torch_npu.npu_dynamic_mx_quant(x, dst_type=dst)
        operand_dtypes = {"x1_dtype": dst, "x2_dtype": dst} if fp4 else {}
        return torch_npu.npu_quant_matmul(
            x_q, runtime["weight"], runtime["weight_scale"], scale_dtype=torch_npu.float8_e8m0fnu,
            pertoken_scale=x_scale, pertoken_scale_dtype=torch_npu.float8_e8m0fnu, bias=bias, output_dtype=x.dtype,
            group_sizes=NPU_GROUP_SIZES, **operand_dtypes,
        )  # fmt: skip


MX_KERNELS = (NpuMX, CpuMX, ReferenceMX)
