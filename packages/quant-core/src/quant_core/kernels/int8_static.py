"""Static per-tensor asymmetric int8 activations × int8 weights with an integer bias (W8A8, W8A8_MIX's static path).

Canonical runtime tensors: ``weight`` int8 ``[N, K]``, ``input_scale`` / ``input_offset`` float32 ``[1]`` (the offset
an integer), ``quant_bias`` int32 ``[N]``, ``deq_scale`` float32 ``[N]``.
Math: ``x_q = clamp(round(x / s_in + o_in), -128, 127)``, ``y = (x_q @ W_qᵀ + quant_bias) · deq_scale``.
The float layer bias is never added: msModelSlim folds it into ``quant_bias``.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.base import LinearKernel, LinearKernelConfig
from quant_core.kernels.int8_dynamic import (
    ACL_FORMAT_FRACTAL_NZ,
    fbgemm_available,
    fbgemm_prepack,
    torch_npu_available,
)
from quant_core.primitives import encode_scale_int64, int_matmul, quantize_static


class ReferenceInt8Static(LinearKernel):
    """The spec in plain torch: exact int32 accumulation, integer bias before the scale."""

    name = "reference-int8-static"
    backend = "reference"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_q = quantize_static(x, runtime["input_scale"], runtime["input_offset"])
        return (int_matmul(x_q, runtime["weight"]) + runtime["quant_bias"]).float() * runtime["deq_scale"]


class FbgemmInt8Static(LinearKernel):
    """fbgemm's static-input linear (``linear_with_input_q_dq_qweight_dq_output_fp32``), exact.

    fbgemm takes u8 activations. Shifted to u8, ModelSlim's s8 ``x_q`` spans 0..255, and on AVX2 without VNNI
    ``vpmaddubsw`` saturates u8·s8 pair sums at int16 (``cpu-kernels.md`` §4: 13 % error on random int8 weights).
    So ``u = x_q + 128`` is split as ``u = 2h + l`` with ``h`` in 0..127 and ``l`` in {0, 1}: both halves are
    7-bit (no saturation) and run as one GEMM of ``2M`` rows on the same packed weight;
    ``2·acc_h + acc_l`` is then the exact integer product (up to float32 rounding of the epilogue).
    Measured at K=N=2048 vs fp32 ``F.linear``: M=1 0.4-0.65x, M=8 0.4-0.65x, M=32 0.9x, M=128 1.2x
    (the unsplit, saturating GEMM would be 0.2-0.5x).
    """

    name = "cpu-fbgemm-int8-static"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return fbgemm_available(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        deq = tensors["deq_scale"]
        packed = fbgemm_prepack(tensors["weight"], deq)
        bias = (tensors["quant_bias"].double() * deq.double()).float()
        return {
            "packed_weight": packed,
            "input_scale": tensors["input_scale"],
            "input_offset": tensors["input_offset"],
            "scaled_quant_bias": bias,
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        u = quantize_static(x, runtime["input_scale"], runtime["input_offset"]).float() + 128
        h = torch.floor(u * 0.5)
        # fbgemm quantizes its float input as round(v / 1.0 + 64): h - 64 -> h, l -> l + 64; zero point 64.
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            torch.cat([h - 64, u - 2 * h]), 1.0, 64, runtime["packed_weight"]
        )
        m = x.shape[0]
        return 2 * y[:m] + y[m:] + runtime["scaled_quant_bias"]


class NpuInt8Static(LinearKernel):
    """Upstream vllm-ascend's calls: ``npu_quantize`` with the reciprocal input scale repeated to K
    (``div_mode=False``), then ``npu_quant_matmul`` with ``deq_scale`` and the int32 ``quant_bias``.

    The reciprocal is kept in float32 (upstream holds it in the model dtype, which rounds it to 8 bits in bf16).
    ``deq_scale`` goes in as int64-encoded float32 for fp16 activations and as float32 otherwise, the form
    msModelSlim writes for fp16 and bf16 models respectively.
    """

    name = "npu-int8-static"
    backend = "npu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return torch_npu_available()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        import torch_npu

        k = self.config.in_features
        scale = tensors["input_scale"].repeat(k)
        return {
            "weight": torch_npu.npu_format_cast(tensors["weight"].T.contiguous(), ACL_FORMAT_FRACTAL_NZ),
            "input_scale_reciprocal": 1 / scale,
            "input_offset": tensors["input_offset"].repeat(k).to(scale.dtype),
            "quant_bias": tensors["quant_bias"],
            "deq_scale": tensors["deq_scale"],
            "deq_scale_int64": encode_scale_int64(tensors["deq_scale"]),
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        x_q = torch_npu.npu_quantize(
            x, runtime["input_scale_reciprocal"], runtime["input_offset"], torch.qint8, -1, False
        )
        deq = runtime["deq_scale_int64" if x.dtype == torch.float16 else "deq_scale"]
        return torch_npu.npu_quant_matmul(x_q, runtime["weight"], deq, bias=runtime["quant_bias"], output_dtype=x.dtype)


INT8_STATIC_KERNELS = (NpuInt8Static, FbgemmInt8Static, ReferenceInt8Static)
