"""``W4A8_FLATQUANT_DYNAMIC`` linear (msModelSlim v1 FlatQuant + per-channel W4A8_DYNAMIC): a per-token Kronecker
transform, then per-token int8 activations × per-channel int4 weights.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features, even; ``a · b = K``, by default
``(a, b) = get_decompose_dim(K)``, but read off the checkpoint, see ``_flatquant.py``):

=================  ============================================  ======================================
name               as loaded                                     after ``process_weights``
=================  ============================================  ======================================
``weight``         int8 ``[N/2, K]``: int4 pairs along N         int8 ``[N, K]`` int4 values (unpacked;
                   (row 2j low nibble, 2j+1 high nibble)         npu ``[K, N]`` NZ, cpu fbgemm-packed)
``weight_scale``   float32 ``[N, 1]`` (v1) or model dtype (v0)   float32 ``[N]``
``weight_offset``  same as ``weight_scale``; zeros; optional     dropped (symmetric: unused)
``scale_bias``     float32 ``[N, 1]`` (column-parallel) or       validated (finite), dropped: an NPU
                   ``[N, 16]`` (row-parallel); optional          A8W4 kernel correction term
``left_trans``     float32 ``[a, a]`` (or model dtype); o_proj:  float32 ``[a, a]``
                   ``[heads, heads]``
``right_trans``    as ``left_trans``, ``[b, b]``; not on o_proj  float32 ``[b, b]`` (absent: identity)
``clip_ratio``     float32 ``[1]`` (or model dtype)              validated (> 0), not used
=================  ============================================  ======================================

Per token: ``X̃ = left_transᵀ · X · right_trans`` on ``X = x.view(a, b)``, then
``y = s_tok · s_w · (round(x̃ / s_tok) @ W_qᵀ) + bias`` with ``s_tok = amax|x̃| / 127`` (int4 weight values in
[-8, 7] through the int8 kernels, exactly). ``clip_ratio`` is not applied, as in W8A8_FLATQUANT_DYNAMIC.
Option ``row_parallel`` picks the ``scale_bias`` shape in ``weight_specs``/``quantize_weights``; ``process_weights``
takes whichever of ``[N, 1]`` / ``[N, 16]`` the checkpoint has.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.flatquant import FLATQUANT_INT8_KERNELS
from quant_core.primitives import pack_int4_rows, quantize_weight_per_channel, unpack_int4_rows
from quant_core.registry import register_scheme
from quant_core.schemes._flatquant import FlatQuantLinear
from quant_core.schemes._linear import check_scale, scale_spec
from quant_core.schemes.w8a8_dynamic import symmetric_int8_weight
from quant_core.spec import TensorSpec

ROW_PARALLEL_CHUNKS = 16  # msModelSlim splits K into 16 partial sums for row-parallel scale_bias


@register_scheme("W4A8_FLATQUANT_DYNAMIC", "linear")
class W4A8FlatQuantDynamicLinear(FlatQuantLinear):
    quant_type = "W4A8_FLATQUANT_DYNAMIC"
    KERNELS = FLATQUANT_INT8_KERNELS

    def __init__(self, *, row_parallel: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.row_parallel = bool(row_parallel)

    def layer_shape(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        half_n, k = tensors["weight"].shape
        return k, 2 * half_n

    def checkpoint_options(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, Any]:
        found = super().checkpoint_options(tensors, layer)
        scale_bias = tensors.get("scale_bias")
        if scale_bias is not None and scale_bias.dim() == 2 and scale_bias.shape[1] in (1, ROW_PARALLEL_CHUNKS):
            found["row_parallel"] = scale_bias.shape[1] == ROW_PARALLEL_CHUNKS
        return found

    def inner_specs(self, in_features: int, out_features: int) -> dict[str, TensorSpec]:
        n, k = out_features, in_features
        if n % 2:
            raise CheckpointTensorError(
                f"{self.quant_type} packs two int4 weights per byte along the output dim, so out_features must be "
                f"even; got {n}. Quantize this layer with a scheme that stores unpacked weights (e.g. W8A8_DYNAMIC)."
            )
        return {
            "weight": TensorSpec("weight", (n // 2, k), torch.int8, output_dim=0, input_dim=1, packed_dim=0,
                                 packed_factor=2),
            "weight_scale": scale_spec("weight_scale", (n, 1), output_dim=0),
            "weight_offset": scale_spec("weight_offset", (n, 1), output_dim=0, optional=True),
            "scale_bias": scale_spec("scale_bias", (n, ROW_PARALLEL_CHUNKS if self.row_parallel else 1),
                                     output_dim=0, input_dim=1 if self.row_parallel else None, optional=True),
        }  # fmt: skip

    def quantize_inner(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        chunks = ROW_PARALLEL_CHUNKS if self.row_parallel else 1
        self.inner_specs(k, n)  # refuses odd N
        if k % chunks:
            raise CheckpointTensorError(f"row-parallel scale_bias splits K into {chunks} chunks; K={k} does not divide")
        q, scale, offset = quantize_weight_per_channel(weight, bits=4, symmetric=True)
        scale_bias = 8 * (q.float() * scale).reshape(n, chunks, k // chunks).sum(-1)
        return {"weight": pack_int4_rows(q), "weight_scale": scale, "weight_offset": offset, "scale_bias": scale_bias}

    def canonicalize_inner(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        if "scale_bias" in tensors:
            check_scale(tensors["scale_bias"], "scale_bias", layer, positive=False)
        out = symmetric_int8_weight(tensors, layer)
        return {**out, "weight": unpack_int4_rows(out["weight"])}
