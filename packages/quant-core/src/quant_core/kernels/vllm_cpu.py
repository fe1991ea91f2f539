"""Per-token int8 W8A8 on vLLM's own CPU int8 ops, when the process has loaded them (inside a vLLM engine).

quant-core never imports vLLM: this kernel only looks for the ops vLLM's CPU build registers under ``torch.ops._C``,
the ones behind vLLM's compressed-tensors int8 path: ``dynamic_scaled_int8_quant`` (per-token codes and scales in one
C++ pass) and ``onednn_scaled_mm`` (a prepacked oneDNN int8 GEMM with the per-token × per-channel dequantization and
the bias fused). At decode a linear's cost is mostly per-call overhead: two calls instead of the fbgemm kernel's
eight torch ops (SmolLM2 576×960, M=1: 33 µs against 63 µs per call).

Numerics: the same scale ``amax|x| / 127`` as the spec; the op multiplies by its reciprocal where the spec divides,
so a code can differ by one where ``x / s`` lies within an ulp of a rounding boundary (measured: 1 code in 10^6 on
random data); int32 sums are exact, the epilogue fp32. With ``runtime.amax_reduce`` (a row-parallel layer under
tensor parallelism) the codes come from quant-core's own quantizer, on the reduced scale, and only the GEMM is
oneDNN's.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.base import LinearKernel, LinearKernelConfig, amax_reducer
from quant_core.primitives import quantize_per_token

PRIMITIVE_CACHE = 4
VLLM_CPU_OPS = ("dynamic_scaled_int8_quant", "create_onednn_scaled_mm_handler", "onednn_scaled_mm")


def vllm_cpu_ops_loaded() -> tuple[bool, str]:
    missing = [op for op in VLLM_CPU_OPS if not hasattr(torch.ops._C, op)]
    if missing:
        return False, f"vLLM's CPU ops are not loaded in this process (torch.ops._C lacks {', '.join(missing)})"
    return True, ""


class VllmOnednnInt8Dynamic(LinearKernel):
    """``W8A8_DYNAMIC`` (and ``W8A8_MIX``'s dynamic mode) through vLLM's ``dynamic_scaled_int8_quant`` and
    ``onednn_scaled_mm``; the handler packs its own copy of the weight and points at the scales, which the runtime
    keeps."""

    name = "cpu-vllm-onednn-int8-dynamic"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        if config.device != "cpu":
            return False, f"weights are on {config.device}, vLLM's oneDNN int8 ops run on cpu"
        return vllm_cpu_ops_loaded()

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        weight = tensors["weight"]  # int8 [N, K]; the op takes [K, N] and packs its own copy
        scale = tensors["weight_scale"].flatten().float().clone()  # the handler keeps a pointer to it: keep it alive
        # oneDNN builds one primitive per token count and caches PRIMITIVE_CACHE of them per layer: vLLM's 32 let a
        # serving burst of varied batch shapes grow the server's RSS by 36 MiB on a tiny model (4: 12 MiB)
        handler = torch.ops._C.create_onednn_scaled_mm_handler(
            weight.t(), scale, torch.float32, True, False, PRIMITIVE_CACHE
        )
        n = weight.shape[0]
        return {"handler": torch.tensor(handler, dtype=torch.int64), "weight_scale": scale, "out_features": n}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float().contiguous()
        reduce = amax_reducer(runtime)
        if reduce is None:
            x_q = torch.empty_like(x32, dtype=torch.int8)
            s_tok = torch.empty(x32.shape[0], 1)
            torch.ops._C.dynamic_scaled_int8_quant(x_q, x32, s_tok, None)
        else:
            x_q, s_tok = quantize_per_token(x32, 8, amax_reduce=reduce)
        y = torch.empty(x32.shape[0], runtime["out_features"])
        bias32 = None if bias is None else bias.float().contiguous()
        torch.ops._C.onednn_scaled_mm(y, x_q, s_tok, None, None, bias32, runtime["handler"])
        return y
