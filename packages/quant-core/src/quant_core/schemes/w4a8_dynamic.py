"""``W4A8_DYNAMIC`` linear: int4 weights packed two per byte along N, in the two forms msModelSlim writes.

The scheme option ``group_size`` (the description's global key) picks the form. Checkpoint tensors under
``<prefix>.`` (``K`` = in_features, ``N`` = out_features, ``g`` = group_size, ``c`` = 1 or 16):

========================  ==========================================  ============================================
name                      as loaded                                   after ``process_weights``
========================  ==========================================  ============================================
``weight``                int8 ``[N/2, K]``; byte ``[j, k]`` holds    int8 ``[N, K]`` int4 values (npu: int32
                          rows 2j (low nibble) and 2j+1 (high)        words ``[K, N/8]``; cpu: fbgemm-/int4pack-
                                                                      packed, or float32 ``[N, K]`` dequantized)
``weight_scale``          float32 ``[N, 1]`` (bf16/fp16 taken)        float32 ``[N]`` (folded into kernel scales)
``weight_offset``         like ``weight_scale``; zeros; optional      dropped (symmetric)
``scale_bias``            float32 ``[N, 1]`` (q/k/v/gate/up) or       dropped after validation: an NPU-kernel
                          ``[N, 16]`` (o_proj/down_proj)              correction, not part of the math
*group_size > 0 only:*
``weight_scale_second``   float32 ``[N, K/g]``, integer values        float32 ``[N, K/g]`` (npu: ``S [K/g, N]``;
                                                                      cpu int4pack: bf16 ``[K/g, N, 2]``)
``weight_offset_second``  int64 ``[N, K/g]`` (float taken); zeros;    dropped (symmetric)
                          optional
========================  ==========================================  ============================================

Per-channel (``group_size == 0``, msModelSlim v1): ``s_tok = amax|x| / 127``, ``x_q = round(x / s_tok)``,
``y = s_tok · s_w · (x_q @ W4ᵀ) + bias`` — W8A8_DYNAMIC with int4-valued weights.

Two-step per-group (``group_size = g > 0``, msModelSlim v0 pipeline, description version "1.0.0"): activations are
*not* quantized (as in the historical upstream scheme): ``y = x · Wᵀ + bias`` with
``W[n, k] = w4[n, k] · weight_scale_second[n, k // g] · weight_scale[n]``.

``scale_bias`` is ``8 · Σ_k W_deq[n, k]`` (``[N, 16]``: one sum per K/16 chunk). It is checked against the weights
as a checksum of the int4 layout (see :func:`verify_scale_bias`); ``verify_scale_bias=False`` skips that.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.base import Runtime
from quant_core.kernels.moe_npu import NpuGroupedDynamicMoE, NpuGroupedWeightOnlyMoE
from quant_core.kernels.w4a8 import W4_GROUP_KERNELS, W4A8_CHANNEL_KERNELS
from quant_core.primitives import pack_int4_rows, quantize_weight_per_channel, unpack_int4_rows
from quant_core.registry import register_scheme
from quant_core.schemes._linear import FLOAT_DTYPES, KernelLinearScheme, check_scale, scale_spec
from quant_core.schemes._moe import ExpertsMoEScheme
from quant_core.schemes.w8a8_dynamic import symmetric_int8_weight
from quant_core.spec import TensorSpec

SCALE_BIAS_CHUNKS = 16  # msModelSlim's hard-coded tp_num (save/utils/pack.py::process_scale)
# scale_bias checksum tolerance: |stored - 8·ΣW_deq| ≤ ATOL · 8·Σ|W_deq| + RTOL · |8·ΣW_deq| per entry.
# Legitimate differences: the producer's float32 summation (≤ K·2^-24 of Σ|W_deq| worst case, 1e-3 covers K ≤ 16k,
# and typical errors are √K smaller) and bf16 storage of scale_bias or weight_scale (2^-9 each, relative to the sum).
# A wrong layout (swapped nibbles, other rows, missing ×8) is off by about the sum itself: typically ≥ 10x these
# bounds per entry (Σ|W_deq| ≈ √K · |ΣW_deq| for random weights), so a whole wrong tensor does not pass.
SCALE_BIAS_ATOL, SCALE_BIAS_RTOL = 1e-3, 1e-2


@dataclass(frozen=True)
class ScaleBiasSpec(TensorSpec):
    """``scale_bias [N, c]``: ``shape`` is the form asked for, but either form loads (``c = 1`` or ``16``; also a
    rank's slice ``c = 16 / tp`` of the row-parallel form)."""

    def check(self, tensor: torch.Tensor, owner: str = "") -> None:
        n = self.shape[0]
        if tensor.dim() == 2 and tensor.shape[0] == n and tensor.shape[1] and SCALE_BIAS_CHUNKS % tensor.shape[1] == 0:
            TensorSpec.check(replace(self, shape=tuple(tensor.shape)), tensor, owner)
            return
        where = f"{owner}.{self.name}" if owner else self.name
        raise CheckpointTensorError(
            f"tensor {where!r} has shape {tuple(tensor.shape)}, expected ({n}, 1) (column-parallel layers) or "
            f"({n}, {SCALE_BIAS_CHUNKS}) (row-parallel layers: one partial sum per K/16 chunk). The checkpoint does "
            "not match the layer it is loaded into, or the tensor is corrupted: re-export the layer with msModelSlim."
        )


def verify_scale_bias(scale_bias: torch.Tensor, canonical: Mapping[str, torch.Tensor], group_size: int, layer: str):
    """Raise unless ``scale_bias [N, c]`` equals ``8 · Σ W_deq`` over each of ``c`` equal K-chunks (within tolerance).

    Exact integer sums of the int4 values over segments that fit both the chunks and the groups, then float32 (NPUs
    lack float64; float32 rounding is ~1e-7 relative, far below the tolerance). No float ``[N, K]`` copy is made.
    """
    where = f"{layer}.scale_bias" if layer else "scale_bias"
    w = canonical["weight"]
    n, k = w.shape
    chunks = scale_bias.shape[1]
    if k % chunks:
        raise CheckpointTensorError(
            f"tensor {where!r} has {chunks} columns (K split into {chunks} equal chunks), but in_features {k} does "
            "not divide by it. The checkpoint does not belong to this layer; re-export it with msModelSlim."
        )
    g = group_size or k
    seg = math.gcd(k // chunks, g)
    w = w.view(n, k // seg, seg)
    scale = canonical["weight_scale"][:, None]
    if group_size:
        scale = scale * canonical["weight_scale_second"].repeat_interleave(g // seg, dim=1)
    expected = 8 * (w.sum(-1, dtype=torch.int32) * scale).view(n, chunks, -1).sum(-1)
    magnitude = 8 * (w.abs().sum(-1, dtype=torch.int32) * scale).view(n, chunks, -1).sum(-1)
    diff = (scale_bias - expected).abs()
    bad = diff > SCALE_BIAS_ATOL * magnitude + SCALE_BIAS_RTOL * expected.abs()
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise CheckpointTensorError(
            f"tensor {where!r} does not match the weights in {int(bad.sum())} of {bad.numel()} entries: "
            f"[{row}, {col}] holds {scale_bias[row, col].item():.6g}, but 8·Σ_k W_deq over that K-chunk is "
            f"{expected[row, col].item():.6g}. scale_bias is a checksum of the dequantized weight, so the int4 "
            "packing or the weight scales are probably not what this scheme reads (another producer's layout, or a "
            "corrupted tensor). Re-export the layer with msModelSlim; if you are sure the weights are right, build "
            "the scheme with verify_scale_bias=False."
        )


@register_scheme("W4A8_DYNAMIC", "linear")
class W4A8DynamicLinear(KernelLinearScheme):
    """Options: ``row_parallel`` makes :meth:`weight_specs` and :meth:`quantize_weights` use the ``[N, 16]``
    ``scale_bias`` (o_proj/down_proj); loading accepts both forms regardless. ``verify_scale_bias`` (default on)
    checks ``scale_bias`` against the weights."""

    quant_type = "W4A8_DYNAMIC"

    def __init__(self, *, row_parallel: bool = False, verify_scale_bias: bool = True, **options) -> None:
        super().__init__(**options)
        self.row_parallel = row_parallel
        self.verify_scale_bias = verify_scale_bias
        self.KERNELS = W4_GROUP_KERNELS if self.group_size else W4A8_CHANNEL_KERNELS

    def check_layer_shape(self, in_features: int, out_features: int, layer: str = "") -> None:
        where = f"layer {layer!r}" if layer else "W4A8_DYNAMIC"
        if out_features % 2:
            raise CheckpointTensorError(
                f"{where}: W4A8_DYNAMIC packs two int4 weights per byte along the output dim, so out_features must "
                f"be even, got {out_features}. Quantize this layer with W8A8_DYNAMIC or keep it float."
            )
        if self.group_size and in_features % self.group_size:
            raise CheckpointTensorError(
                f"{where}: group_size {self.group_size} does not divide in_features {in_features}. Use the "
                "description's group_size for this checkpoint, or re-quantize with a group size that divides "
                f"{in_features} (or group_size=0, the per-channel form)."
            )

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        self.check_layer_shape(in_features, out_features)
        n, k = out_features, in_features
        # [N, 16] holds per-K-chunk sums: a row-parallel rank takes its 16/tp columns
        chunk_dims = {"output_dim": 0, "input_dim": 1} if self.row_parallel else {"output_dim": 0}
        chunks = SCALE_BIAS_CHUNKS if self.row_parallel else 1
        specs = {
            "weight": TensorSpec(
                "weight", (n // 2, k), torch.int8, output_dim=0, input_dim=1, packed_dim=0, packed_factor=2
            ),
            "weight_scale": scale_spec("weight_scale", (n, 1), output_dim=0),
            "weight_offset": scale_spec("weight_offset", (n, 1), output_dim=0, optional=True),
            "scale_bias": ScaleBiasSpec(
                "scale_bias", (n, chunks), torch.float32, accepted_dtypes=FLOAT_DTYPES[1:], **chunk_dims
            ),
        }
        if self.group_size:
            groups = (n, k // self.group_size)
            specs["weight_scale_second"] = scale_spec("weight_scale_second", groups, output_dim=0, input_dim=1)
            specs["weight_offset_second"] = TensorSpec(
                "weight_offset_second", groups, torch.int64, output_dim=0, input_dim=1,
                accepted_dtypes=FLOAT_DTYPES, optional=True,
            )  # fmt: skip
        return specs

    def quantize_weights(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, row_parallel: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Symmetric RTN. Per-channel: int4 per row, ``s = amax / 7``. Two-step (``group_size = g``): int8 per row
        (``s = amax / 127``), then each group of g int8 values to int4 with the integer scale
        ``s2 = max(1, ceil(amax_int8 / 7.5))``, ``w4 = clamp(round(w8 / s2), -8, 7)``: the smallest integer scale
        that keeps every value within half a step of the grid (+7.5 steps rounds to 8, clamps to 7). On Gaussian
        weights g=64: 10.5 % rms error, vs 10.8 % for round(amax / 7) (which clips small-range groups) and 11.2 %
        for ceil(amax / 7).
        ``row_parallel`` (default: the scheme option) writes ``scale_bias [N, 16]`` instead of ``[N, 1]``."""
        n, k = weight.shape
        self.check_layer_shape(k, n)
        chunks = SCALE_BIAS_CHUNKS if (self.row_parallel if row_parallel is None else row_parallel) else 1
        if k % chunks:
            raise CheckpointTensorError(
                f"a row-parallel W4A8_DYNAMIC scale_bias splits K into {chunks} chunks; in_features {k} does not "
                "divide by it. Use row_parallel=False (scale_bias [N, 1]) for this layer."
            )
        tensors = {}
        if self.group_size:
            g = self.group_size
            w8, scale, offset = quantize_weight_per_channel(weight, bits=8)
            w8 = w8.float().view(n, k // g, g)
            second = (w8.abs().amax(-1) / 7.5).ceil().clamp_min(1)
            w4 = torch.clamp(torch.round(w8 / second[..., None]), -8, 7).to(torch.int8).view(n, k)
            deq_scale = (scale * second).repeat_interleave(g, dim=1)
            tensors = {"weight_scale_second": second, "weight_offset_second": torch.zeros(n, k // g, dtype=torch.int64)}
        else:
            w4, scale, offset = quantize_weight_per_channel(weight, bits=4)
            deq_scale = scale
        scale_bias = 8 * (w4.float() * deq_scale).view(n, chunks, k // chunks).sum(-1)
        return {"weight": pack_int4_rows(w4), "weight_scale": scale, "weight_offset": offset,
                "scale_bias": scale_bias, **tensors}  # fmt: skip

    def layer_shape(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        half_n, k = tensors["weight"].shape
        return k, 2 * half_n

    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> Runtime:
        if not self.group_size and "weight_scale_second" in tensors:
            raise CheckpointTensorError(
                f"layer {layer or '<layer>'!r} has weight_scale_second: a two-step per-group W4A8_DYNAMIC checkpoint "
                "(msModelSlim v0 pipeline), but the scheme was built with group_size=0. Pass the description's "
                "global group_size, e.g. get_scheme('W4A8_DYNAMIC', 'linear', group_size=64)."
            )
        weight, scale = tensors.get("weight"), tensors.get("weight_scale")
        if weight is not None and weight.dim() == 2:
            if scale is not None and scale.dim() and scale.shape[0] == weight.shape[0]:
                raise CheckpointTensorError(
                    f"tensor {layer + '.' if layer else ''}weight has shape {tuple(weight.shape)}, as many rows as "
                    'weight_scale: one int4 value per byte (the historical version "0" layout), not two per byte '
                    "along N ([N/2, K]) as msModelSlim writes. Re-export with msModelSlim, or pack the rows "
                    "(quant_core.primitives.pack_int4_rows)."
                )
            self.check_layer_shape(weight.shape[1], 2 * weight.shape[0], layer)
        return super().process_weights(tensors, layer=layer)

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        canonical = symmetric_int8_weight(tensors, layer)
        canonical["weight"] = unpack_int4_rows(tensors["weight"])
        if self.group_size:
            canonical["weight_scale_second"] = check_scale(tensors["weight_scale_second"], "weight_scale_second", layer)
            offset = tensors.get("weight_offset_second")
            if offset is not None and check_scale(offset, "weight_offset_second", layer, positive=False).any():
                raise CheckpointTensorError(
                    f"tensor {layer + '.' if layer else ''}weight_offset_second is non-zero, but two-step W4A8 "
                    "weights are symmetric (msModelSlim writes zeros). The description's quant type is probably wrong."
                )
        scale_bias = check_scale(tensors["scale_bias"], "scale_bias", layer, positive=False)
        if self.verify_scale_bias:
            verify_scale_bias(scale_bias, canonical, self.group_size, layer)
        return canonical


@register_scheme("W4A8_DYNAMIC", "moe")
class W4A8DynamicMoE(ExpertsMoEScheme):
    """Stacked experts (format §5.6.1): ``w13_weight`` int8 ``[E, I, H]`` (int4 pairs along N),
    ``w13_weight_scale``/``w13_weight_offset``/``w13_scale_bias`` float32 ``[E, 2I, 1]``; ``w2_weight`` int8
    ``[E, H/2, I]``, ``w2_weight_scale``/``w2_weight_offset`` ``[E, H, 1]``, ``w2_scale_bias`` ``[E, H, 16]`` (the
    row-parallel form). With ``group_size > 0`` (the two-step v0 form) also ``*_weight_scale_second`` /
    ``*_weight_offset_second`` ``[E, N, K/g]``; like the linear scheme, that form keeps activations in float
    (the removed upstream per-group MoE kernel quantized them per token; upstream now refuses the form)."""

    quant_type = "W4A8_DYNAMIC"

    def projection_options(self, proj: str) -> dict:
        return {"row_parallel": proj == "w2"}

    @property
    def NPU_KERNEL(self):
        return NpuGroupedWeightOnlyMoE(int4=True) if self.group_size else NpuGroupedDynamicMoE(int4=True)
