"""Per-token dynamic int4 activations × per-channel int4 weights (W4A4_DYNAMIC; W4A4_FLATQUANT_DYNAMIC after its
transform, see :mod:`quant_core.kernels.flatquant`).

Canonical runtime tensors: ``weight`` int8 ``[N, K]`` holding int4 values in [-8, 7], ``weight_scale`` float32
``[N]``, optionally ``clip_ratio`` (a Python float, 1 when absent).
Math: ``s_tok = clip_ratio · amax|x| / 7``, ``q = clamp(round(x / s_tok), -8, 7)``,
``y = s_tok · s_w · (q @ W_qᵀ) + bias``; the per-token amax goes through ``runtime.amax_reduce`` when set (see
``kernels.base.Runtime``).
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.base import LinearKernel, LinearKernelConfig, amax_reducer
from quant_core.kernels.int8_dynamic import FbgemmInt8Dynamic, npu_quantize_per_token, torch_npu_available
from quant_core.primitives import int_matmul, quantize_per_token


def npu_int4_packs(config: LinearKernelConfig) -> tuple[bool, str]:
    ok, why = torch_npu_available()
    if ok and config.in_features % 8:
        return False, f"the NPU packs int4 8 per int32 along K; K={config.in_features} is not a multiple of 8"
    return ok, why


class ReferenceInt4Dynamic(LinearKernel):
    """The spec in plain torch: exact int32 accumulation."""

    name = "reference-int4-dynamic"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_q, s_tok = quantize_per_token(x, 4, runtime.get("clip_ratio", 1.0), amax_reducer(runtime))
        y = int_matmul(x_q, runtime["weight"]).float() * s_tok * runtime["weight_scale"]
        return y if bias is None else y + bias.float()


class FbgemmInt4Dynamic(FbgemmInt8Dynamic):
    """Exact int4 × int4 through fbgemm's int8 GEMM (int4 values are int8 values).

    The per-token int4 values ``q`` go in with fixed quantization parameters, scale 1 and zero point 8, so fbgemm
    sees u8 ``q + 8`` in [0, 15], far from the int16 saturation of AVX2 ``vpmaddubsw``: exact, and the same for a
    row whatever else is in the batch. Measured 2-6x faster than ``onednn.qlinear_pointwise`` with u8 activations
    at M=1, equal at M=128 (see the scheme tests)."""

    name = "cpu-fbgemm-int4-dynamic"
    backend = "cpu"

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**super().prepare(tensors), "clip_ratio": tensors.get("clip_ratio", 1.0)}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_q, s_tok = quantize_per_token(x, 4, runtime["clip_ratio"], amax_reducer(runtime))
        y = (
            torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x_q.float(), 1.0, 8, runtime["packed_weight"]
            )
            * s_tok
        )
        return y if bias is None else y + bias.float()


class NpuInt4Dynamic(LinearKernel):
    """Upstream vllm-ascend's W4A4_DYNAMIC calls: the weight packed 8 int4 per int32 along K (``[N, K/8]``, passed
    as a transposed view), ``npu_dynamic_quant(dst_type=quint4x2)``, ``npu_quant_matmul`` into float16, then cast.
    With ``runtime.amax_reduce``: ``int8_dynamic.npu_quantize_per_token``."""

    name = "npu-int4-dynamic"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return npu_int4_packs(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        import torch_npu

        packed = torch_npu.npu_convert_weight_to_int4pack(tensors["weight"].to(torch.int32))
        return {"weight_packed": packed, "weight_scale": tensors["weight_scale"]}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        x_q, s_tok = npu_quantize_per_token(x, torch.quint4x2, 7, amax_reducer(runtime))
        y = torch_npu.npu_quant_matmul(
            x_q, runtime["weight_packed"].t(), runtime["weight_scale"], pertoken_scale=s_tok,
            output_dtype=torch.float16,
        ).to(x.dtype)  # fmt: skip
        return y if bias is None else y + bias.to(x.dtype)


INT4_DYNAMIC_KERNELS = (NpuInt4Dynamic, FbgemmInt4Dynamic, ReferenceInt4Dynamic)
