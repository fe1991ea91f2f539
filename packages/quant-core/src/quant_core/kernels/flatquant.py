"""FlatQuant: a per-token Kronecker transform of the activations, then a per-token dynamic quantized matmul.

Canonical runtime tensors: the inner computation's (``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N]``)
plus ``left_trans`` float32 ``[a, a]``, ``right_trans`` float32 ``[b, b]`` with ``a · b = K`` (absent for o_proj:
identity) and ``clip_ratio`` (a Python float).
Transform: each token ``x`` viewed row-major as ``X [a, b]`` becomes ``X̃ = left_transᵀ · X · right_trans``, i.e.
``x̃ = x · (left_trans ⊗ right_trans)`` (``vec(AXB) = vec(X)(Aᵀ ⊗ B)`` for row-major vec).
Int4 inner (W4A4_FLATQUANT_DYNAMIC): ``s_tok = clip_ratio · amax|x̃| / 7``; int8 inner (W8A8 / W4A8
``_FLATQUANT_DYNAMIC``): plain per-token int8, ``clip_ratio`` unused. The per-token amax of ``x̃`` goes through
``runtime.amax_reduce`` when set, as in the inner kernels (see ``kernels.base.Runtime``; the transform mixes the
whole row, so an adapter normally gives these layers whole rows instead).
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.base import LinearKernelConfig, amax_reducer
from quant_core.kernels.int4_dynamic import FbgemmInt4Dynamic, NpuInt4Dynamic, ReferenceInt4Dynamic, npu_int4_packs
from quant_core.kernels.int8_dynamic import (
    FbgemmInt8Dynamic,
    NpuInt8Dynamic,
    ReferenceInt8Dynamic,
    npu_quantize_per_token,
)

TRANSFORM_KEYS = ("left_trans", "right_trans", "clip_ratio")
NPU_KRONECKER_MAX_TOKENS = 32768  # npu_kronecker_quant's per-call limit (upstream chunks)


def kronecker_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` -> float32 ``x · (left ⊗ right)``, computed as ``leftᵀ · X · right`` on ``X = x.view(M, a, b)``."""
    m, k = x.shape
    a = left.shape[0]
    xt = left.T @ x.float().reshape(m, a, k // a)
    if right is not None:
        xt = xt @ right
    return xt.reshape(m, k)


class KroneckerInput:
    """Mixin over a per-token kernel: keep the transform tensors through ``prepare``, transform ``x`` in ``run``."""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        inner = {n: t for n, t in tensors.items() if n not in TRANSFORM_KEYS}
        return {**super().prepare(inner), **{n: tensors[n] for n in TRANSFORM_KEYS if n in tensors}}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super().run(runtime, kronecker_transform(x, runtime["left_trans"], runtime.get("right_trans")), bias)


# --- int4 activations (W4A4_FLATQUANT_DYNAMIC) -----------------------------------------------------------------
class ReferenceFlatQuantInt4(KroneckerInput, ReferenceInt4Dynamic):
    name = "reference-flatquant-int4"


class FbgemmFlatQuantInt4(KroneckerInput, FbgemmInt4Dynamic):
    name = "cpu-fbgemm-flatquant-int4"


class NpuKroneckerInt4(NpuInt4Dynamic):
    """Upstream's calls: ``npu_kronecker_quant`` (transform + clipped int4 quantization, ≤ 32768 tokens per call) on
    ``x.view(T, a, b)`` with the checkpoint's ``left_trans`` passed transposed (the op computes ``A · X · B``), then
    ``npu_quant_matmul`` with the weight packed 8 int4 per int32 along K. The op computes its own scale: with
    ``runtime.amax_reduce``, the transform runs as two small matmuls and ``npu_quantize`` takes the reduced scale."""

    name = "npu-kronecker-int4"

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        ok, why = npu_int4_packs(config)
        right_dim = config.in_features // config.options.get("left_dim", 1)
        if ok and right_dim % 8:
            return False, f"npu_kronecker_quant packs 8 int4 per int32 along the right factor; b={right_dim} % 8 != 0"
        return ok, why

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        runtime = super().prepare(tensors)
        left, right = tensors["left_trans"].T.contiguous(), tensors["right_trans"]
        return {**runtime, "left_trans": left, "right_trans": right, "clip_ratio": tensors["clip_ratio"]}

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import torch_npu

        k = x.shape[-1]
        out = []
        for chunk in x.split(NPU_KRONECKER_MAX_TOKENS):
            x_q, s_tok = self.quantize(runtime, chunk)
            out.append(torch_npu.npu_quant_matmul(
                x_q.reshape(-1, k // 8), runtime["weight_packed"].t(), runtime["weight_scale"],
                pertoken_scale=s_tok.reshape(-1), output_dtype=x.dtype,
            ))  # fmt: skip
        y = torch.cat(out)
        return y if bias is None else y + bias.to(x.dtype)

    @staticmethod
    def quantize(runtime: Mapping[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed, clipped int4 codes (int32 words) and per-token scales of ``x [T, K]``."""
        import torch_npu

        left, right, clip = runtime["left_trans"].to(x.dtype), runtime["right_trans"].to(x.dtype), runtime["clip_ratio"]
        if amax_reducer(runtime) is not None:
            xt = kronecker_transform(x, left.T, right).to(x.dtype)
            return npu_quantize_per_token(xt, torch.quint4x2, 7, amax_reducer(runtime), clip)
        xs = x.reshape(-1, left.shape[0], right.shape[0])
        return torch_npu.npu_kronecker_quant(xs, left, right, clip_ratio=clip, dst_dtype=torch.int32)


# --- int8 activations (W8A8 / W4A8 _FLATQUANT_DYNAMIC) ---------------------------------------------------------
class ReferenceFlatQuantInt8(KroneckerInput, ReferenceInt8Dynamic):
    name = "reference-flatquant-int8"


class FbgemmFlatQuantInt8(KroneckerInput, FbgemmInt8Dynamic):
    name = "cpu-fbgemm-flatquant-int8"


class NpuFlatQuantInt8(KroneckerInput, NpuInt8Dynamic):
    """The transform as two small matmuls on the device, then :class:`NpuInt8Dynamic`'s calls. The transformed
    activations go back to ``x``'s dtype first: ``npu_dynamic_quant`` takes fp16/bf16."""

    name = "npu-flatquant-int8"

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xt = kronecker_transform(x, runtime["left_trans"], runtime.get("right_trans")).to(x.dtype)
        return NpuInt8Dynamic.run(self, runtime, xt, bias)


FLATQUANT_INT4_KERNELS = (NpuKroneckerInt4, FbgemmFlatQuantInt4, ReferenceFlatQuantInt4)
FLATQUANT_INT8_KERNELS = (NpuFlatQuantInt8, FbgemmFlatQuantInt8, ReferenceFlatQuantInt8)
