"""Per-token dynamic FP8 activations × per-channel FP8 weights (WFP8AFP8_DYNAMIC / W8A8FP8_DYNAMIC).

Canonical runtime tensors: ``weight`` ``float8_e4m3fn [N, K]``, ``weight_scale`` float32 ``[N]``.
Math (``modelslim-format.md`` §5.3): ``s_tok = amax|x| / 448``, ``x_q = fp8(x / s_tok)`` (nearest even, saturating),
``y = s_tok · s_w · (x_q @ W_qᵀ) + bias``; the per-token amax goes through ``runtime.amax_reduce`` when set (see
``kernels.base.Runtime``).

As for MX (``kernels/mx.py``): torch 2.13 has no fast FP8 GEMM on x86 (``torch._scaled_mm`` with row-wise scales is
2-70x slower than float32 ``F.linear`` at K=N=2048, M=1..128, measured), so the CPU kernel folds the weight scale
into a float32 copy of the weight once and runs ``F.linear`` on the FP8-rounded activations times ``s_tok``.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from quant_core.float_formats import FP8_MAX, quantize_fp8_per_token
from quant_core.kernels.base import LinearKernel, LinearKernelConfig, amax_reducer
from quant_core.kernels.int8_dynamic import npu_quantize_per_token, torch_npu_available


class ReferenceFp8Dynamic(LinearKernel):
    """The spec in plain torch: FP8 × FP8 products are exact in float32; scales applied to the sums."""

    name = "reference-fp8-dynamic"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_q, s_tok = quantize_fp8_per_token(x, amax_reducer(runtime))
        y = (x_q @ runtime["weight"].float().T) * s_tok * runtime["weight_scale"]
        return y if bias is None else y + bias.float()


class CpuFp8Dynamic(LinearKernel):
    """``W_q · s_w`` cached in float32; ``F.linear(x_q · s_tok, ·)`` (module docstring)."""

    name = "cpu-fp8-dequantized-fp32"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.device != "cpu":
            return False, f"weights are on {config.device}, this kernel runs on cpu"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"weight": tensors["weight"].float() * tensors["weight_scale"][:, None]}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_q, s_tok = quantize_fp8_per_token(x, amax_reducer(runtime))
        return F.linear(x_q * s_tok, runtime["weight"], None if bias is None else bias.float())


class NpuFp8Dynamic(LinearKernel):
    """Upstream vllm-ascend's W8A8FP8_DYNAMIC calls: ``npu_dynamic_quant(dst_type=float8_e4m3fn)``, then
    ``npu_quant_matmul`` with the weight ``[K, N]`` (not NZ), per-channel and per-token float32 scales; the bias is
    added after the matmul. With ``runtime.amax_reduce``: ``int8_dynamic.npu_quantize_per_token``."""

    name = "npu-fp8-dynamic"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return torch_npu_available()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"weight": tensors["weight"].T.contiguous(), "weight_scale": tensors["weight_scale"]}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        x_q, s_tok = npu_quantize_per_token(x, torch.float8_e4m3fn, FP8_MAX, amax_reducer(runtime))
        y = torch_npu.npu_quant_matmul(
            x_q, runtime["weight"], runtime["weight_scale"], pertoken_scale=s_tok, output_dtype=x.dtype
        )
        return y if bias is None else y + bias.to(y.dtype)


FP8_DYNAMIC_KERNELS = (NpuFp8Dynamic, CpuFp8Dynamic, ReferenceFp8Dynamic)
