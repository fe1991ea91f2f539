"""Per-token dynamic int8 activations × per-channel int8 weights (W8A8_DYNAMIC, W8A8_MIX's dynamic path).

Canonical runtime tensors: ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N]``.
Math: ``s_tok = amax|x| / 127``, ``x_q = round(x / s_tok)``, ``y = s_tok · s_w · (x_q @ W_qᵀ) + bias``; the
per-token amax goes through ``runtime.amax_reduce`` when set (a part of each row, see ``kernels.base.Runtime``).
"""

import functools
import importlib.util
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.base import AmaxReduce, LinearKernel, LinearKernelConfig, amax_reducer
from quant_core.kernels.vllm_cpu import VllmOnednnInt8Dynamic
from quant_core.primitives import int_matmul, quantize_per_token, token_amax

ACL_FORMAT_FRACTAL_NZ = 29


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
        x_q, s_tok = quantize_per_token(x, 8, amax_reduce=amax_reducer(runtime))
        y = int_matmul(x_q, runtime["weight"]).float() * s_tok * runtime["weight_scale"]
        return y if bias is None else y + bias.float()


class FbgemmInt8Dynamic(LinearKernel):
    """fbgemm's int8 GEMM, exact per-token int8 on the spec's codes ``q`` in [-127, 127] (the reference's own
    quantizer). Where fbgemm would saturate (AVX2 without VNNI, probed once), ``q = 2·hi + lo`` with ``hi`` in
    [-64, 63] and ``lo`` in {0, 1}: both go through one GEMM call as stacked rows (u8 ``code + 64``, 7 bits), and
    ``y = (2·y_hi + y_lo) · s_tok``.

    Why: without VNNI, fbgemm multiplies u8 × s8 pairs with ``vpmaddubsw``, which saturates at int16 for full-range
    u8 activations (about +3 % perplexity on SmolLM2, measured); plain 7-bit activations avoid that but halve the
    activation resolution (+4 %). Splitting keeps all 8 bits, exactly, and stays per token: a row's result does not
    depend on the rest of the batch. The extra rows are nearly free when the GEMM is weight-bound (decode) and
    double the arithmetic when it is compute-bound (large M); VNNI CPUs need no split."""

    name = "cpu-fbgemm-int8-dynamic"
    backend = "cpu"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return fbgemm_available(config)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"packed_weight": fbgemm_prepack(tensors["weight"], tensors["weight_scale"])}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if fbgemm_saturates():
            x_q, s_tok = quantize_per_token(x, 8, amax_reduce=amax_reducer(runtime))
            y = exact_int8_gemm(x_q.float(), runtime["packed_weight"])
        else:  # the same codes in fewer elementwise passes: this path is per-call overhead at decode
            codes, s_tok = scale_per_token(x, amax_reducer(runtime))
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                codes, 1.0, 128, runtime["packed_weight"]
            )
        y.mul_(s_tok)
        return y if bias is None else y.add_(bias)


def scale_per_token(x: torch.Tensor, amax_reduce: AmaxReduce | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 codes of :func:`quantize_per_token` as float32 (rounded, not clamped: ``|x / s_tok| <= 127`` up to
    one rounding, which the GEMM's own clamp absorbs) and ``s_tok = amax|x| / 127``. The rounding stays here: fbgemm
    adds the zero point before it rounds, which moves ties. All-zero rows divide by the smallest normal float
    instead of 0, giving codes 0 as the reference does. ``amax_reduce``: see ``primitives.token_amax``."""
    x32 = x.float()
    s_tok = token_amax(x32, amax_reduce).div_(127)
    return torch.div(x32, s_tok.clamp_min(torch.finfo(torch.float32).tiny)).round_(), s_tok


def exact_int8_gemm(codes: torch.Tensor, packed_weight: Any) -> torch.Tensor:
    """``codes [M, K] @ (W_q · s_w)ᵀ`` in float32 for integer-valued ``codes`` in [-128, 127], exact.

    One pass with u8 ``code + 128`` where fbgemm accumulates u8 × s8 in int32 (VNNI); otherwise the split into
    7-bit ``hi`` rows and 1-bit ``lo`` rows, which no int16 pair sum can saturate."""
    if not fbgemm_saturates():
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 128, packed_weight)
    hi = torch.floor(codes * 0.5)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        torch.cat([hi, codes.sub_(hi * 2)]), 1.0, 64, packed_weight
    )
    rows = hi.shape[0]
    return y[:rows].mul_(2).add_(y[rows:])


@functools.cache
def fbgemm_saturates() -> bool:
    """Whether fbgemm sums u8 × s8 pairs in int16 here (AVX2 ``vpmaddubsw`` without VNNI), probed once per process
    on the worst case: u8 255 against s8 127, whose pair sum 64,770 does not fit int16."""
    k = 64
    packed = fbgemm_prepack(torch.full((1, k), 127, dtype=torch.int8), torch.ones(1))
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.full((1, k), 127.0), 1.0, 128, packed)
    return y.item() != 127 * 127 * k


class FbgemmInt8DynamicInt4Weights(FbgemmInt8Dynamic):
    """:class:`FbgemmInt8Dynamic` for int4 weight values (W4A8): with ``|w| ≤ 8`` no u8 × s8 pair can reach the
    int16 limit (2 · 255 · 8 = 4080), so the full 8-bit codes go through one GEMM pass, exactly."""

    name = "cpu-fbgemm-int8-dynamic-int4-weights"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        codes, s_tok = scale_per_token(x, amax_reducer(runtime))
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes, 1.0, 128, runtime["packed_weight"]
        ).mul_(s_tok)
        return y if bias is None else y.add_(bias)


def npu_quantize_per_token(
    x: torch.Tensor, dst_type: torch.dtype, qmax: float, amax_reduce: AmaxReduce | None, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_dynamic_quant(x, dst_type)``'s ``(codes, scale [M])``, or, with ``amax_reduce``, the same with the
    per-token amax through it: ``npu_dynamic_quant`` computes its own scale, so the scale is computed here and the
    codes come from ``npu_quantize`` with that per-token scale (``axis=-2``: the scales index the rows;
    ``div_mode``: ``x / s``). FP8 codes, which ``npu_quantize`` does not document, are a saturating cast."""
    import torch_npu

    if amax_reduce is None:
        return torch_npu.npu_dynamic_quant(x, dst_type=dst_type)
    scale = token_amax(x.float(), amax_reduce) * clip_ratio / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: codes 0
    if dst_type == torch.float8_e4m3fn:
        x_q = (x.float() / safe).clamp_(-qmax, qmax).to(dst_type)
    else:
        npu_dtype = torch.qint8 if dst_type == torch.int8 else dst_type
        x_q = torch_npu.npu_quantize(x, safe.reshape(-1), None, npu_dtype, axis=-2, div_mode=True)
    return x_q, scale.reshape(-1)


class NpuInt8Dynamic(LinearKernel):
    """Upstream vllm-ascend's calls: ``npu_dynamic_quant`` then ``npu_quant_matmul`` with the weight ``[K, N]``
    (with ``runtime.amax_reduce``: :func:`npu_quantize_per_token`)."""

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

        x_q, s_tok = npu_quantize_per_token(x, torch.int8, 127, amax_reducer(runtime))
        return torch_npu.npu_quant_matmul(
            x_q, runtime["weight"], runtime["weight_scale"], pertoken_scale=s_tok, bias=bias, output_dtype=x.dtype
        )


# vLLM's own int8 ops where a vLLM engine has loaded them (less per-call overhead), else fbgemm
INT8_DYNAMIC_KERNELS = (NpuInt8Dynamic, VllmOnednnInt8Dynamic, FbgemmInt8Dynamic, ReferenceInt8Dynamic)
