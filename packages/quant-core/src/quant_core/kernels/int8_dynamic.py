"""Per-token dynamic int8 activations × per-channel int8 weights (W8A8_DYNAMIC, W8A8_MIX's dynamic path).

Canonical runtime tensors: ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N]``.
Math: ``s_tok = amax|x| / 127``, ``x_q = round(x / s_tok)``, ``y = s_tok · s_w · (x_q @ W_qᵀ) + bias``.
"""

import importlib.util
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.base import LinearKernel, LinearKernelConfig
from quant_core.primitives import int_matmul, quantize_per_token

ACL_FORMAT_FRACTAL_NZ = 29
SEVEN_BIT_SCALE, SEVEN_BIT_ZERO_POINT = 2 / 127, 64  # [-1, 1] on u8 0..127: no int16 saturation on AVX2


def torch_npu_available() -> tuple[bool, str]:
    if "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is not None:
        return True, ""
    return False, "torch_npu is not installed"


def fbgemm_available(config: LinearKernelConfig) -> tuple[bool, str]:
    if config.device != "cpu":
        return False, f"weights are on {config.device}, fbgemm runs on cpu"
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False, f"quantized engine is {torch.backends.quantized.engine!r}, not x86/fbgemm"
    return True, ""


def fbgemm_prepack(weight: torch.Tensor, scales: torch.Tensor) -> Any:
    """fbgemm's packed form of an int8 ``[N, K]`` weight with per-channel ``scales [N]`` (symmetric)."""
    scales = scales.double()
    zero_points = torch.zeros_like(scales, dtype=torch.long)
    with warnings.catch_warnings():  # quantized-tensor constructors are deprecated; this is their last use
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(weight, scales, zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


class ReferenceInt8Dynamic(LinearKernel):
    """The spec in plain torch: exact int32 accumulation."""

    name = "reference-int8-dynamic"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_q, s_tok = quantize_per_token(x, 8)
        y = int_matmul(x_q, runtime["weight"]).float() * s_tok * runtime["weight_scale"]
        return y if bias is None else y + bias.float()


class FbgemmInt8Dynamic(LinearKernel):
    """fbgemm's int8 GEMM with each row first scaled to unit absmax (the per-token trick of ``cpu-kernels.md`` §4)
    and quantized on one fixed 7-bit grid, so it acts per token; 7-bit activations avoid the int16 saturation of
    AVX2 ``vpmaddubsw``. Not bit-identical to the NPU
    (7-bit instead of 8-bit activations); error vs the float layer is comparable (see the tests)."""

    name = "cpu-fbgemm-int8-dynamic"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return fbgemm_available(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"packed_weight": fbgemm_prepack(tensors["weight"], tensors["weight_scale"])}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float()
        amax = x32.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # a zero row stays zero: 0 / tiny = 0
        # Every normalized row spans at most [-1, 1]; quantizing with that fixed grid (7 bits: u8 0..127, zero point
        # 64), instead of letting fbgemm pick one range for the whole batch, gives each row the same result whatever
        # else is in the batch, like true per-token quantization (vLLM batches rows differently from a forward).
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x32 / amax, SEVEN_BIT_SCALE, SEVEN_BIT_ZERO_POINT, runtime["packed_weight"]
        ).mul_(amax)
        return y if bias is None else y.add_(bias)


class NpuInt8Dynamic(LinearKernel):
    """Upstream vllm-ascend's calls: ``npu_dynamic_quant`` then ``npu_quant_matmul`` with the weight ``[K, N]``."""

    name = "npu-int8-dynamic"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return torch_npu_available()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        import torch_npu

        weight = torch_npu.npu_format_cast(tensors["weight"].T.contiguous(), ACL_FORMAT_FRACTAL_NZ)
        return {"weight": weight, "weight_scale": tensors["weight_scale"]}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        x_q, s_tok = torch_npu.npu_dynamic_quant(x)
        return torch_npu.npu_quant_matmul(
            x_q, runtime["weight"], runtime["weight_scale"], pertoken_scale=s_tok, bias=bias, output_dtype=x.dtype
        )


INT8_DYNAMIC_KERNELS = (NpuInt8Dynamic, FbgemmInt8Dynamic, ReferenceInt8Dynamic)
