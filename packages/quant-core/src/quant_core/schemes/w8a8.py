"""``W8A8`` linear: int8 per-channel weights, static per-tensor asymmetric int8 activations, integer bias.

Checkpoint tensors under ``<prefix>.`` (``K`` = in_features, ``N`` = out_features):

=================  ==============================================  ======================================
name               as loaded                                       after ``process_weights``
=================  ==============================================  ======================================
``weight``         int8 ``[N, K]``                                 int8 ``[N, K]`` (npu: ``[K, N]``, NZ;
                                                                   cpu: fbgemm-packed ``packed_weight``)
``input_scale``    float32 ``[1]`` (v1) or model dtype (v0)        float32 ``[1]`` (npu: reciprocal ``[K]``)
``input_offset``   as ``input_scale``; an integer in [-128, 127]   float32 ``[1]`` (npu: repeated to ``[K]``)
``quant_bias``     int32 ``[N]``                                   int32 ``[N]`` (cpu: folded into a float
                                                                   bias ``quant_bias · deq_scale``)
``deq_scale``      float32 ``[N]`` (bf16/fp32 models) or int64     float32 ``[N]`` (npu: also int64 for
                   ``[N]`` holding float32 bits (fp16 models)      fp16 activations)
``weight_scale``   model dtype ``[N, 1]``; v0 only, optional       dropped (folded into ``deq_scale``)
``weight_offset``  model dtype ``[N, 1]``; v0 only, optional       dropped
=================  ==============================================  ======================================

``x_q = clamp(round(x / input_scale + input_offset), -128, 127)``;
``y = (x_q @ W_qᵀ + quant_bias) · deq_scale``.

**The float layer bias passed to ``apply`` is NOT added**: msModelSlim folds it into ``quant_bias``
(``quant_bias = round(bias / deq_scale) - input_offset · Σ_k W_q``), as upstream vllm-ascend assumes when it
ignores the layer bias. Under row-parallel tensor parallelism only rank 0 may add ``quant_bias`` (upstream
passes it on rank 0 only); that is the adapter's job.

``quantize_weights(weight, bias=None, **calibration)`` needs the activation range: either ``input_scale``
(and optionally ``input_offset``, default 0) or ``act_min`` / ``act_max`` (asymmetric int8 over
``[min(act_min, 0), max(act_max, 0)]``). It writes the v1 layout with ``deq_scale = input_scale · weight_scale``
(int64-encoded when ``weight`` is float16) and the bias folded into ``quant_bias``.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.int8_static import INT8_STATIC_KERNELS
from quant_core.primitives import INT8_RANGE, as_float32, encode_scale_int64, quantize_weight_per_channel
from quant_core.registry import register_scheme
from quant_core.schemes._linear import FLOAT_DTYPES, KernelLinearScheme, check_scale, scale_spec
from quant_core.spec import TensorSpec

INT32_MAX = 2**31 - 1


def static_int8_specs(in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
    """The W8A8 tensors; v0's ``weight_scale`` / ``weight_offset`` are optional (v1 leaves them out)."""
    n, k = out_features, in_features
    deq_dtypes = (torch.int64, torch.float32) if params_dtype == torch.float16 else (torch.float32, torch.int64)
    return {
        "weight": TensorSpec("weight", (n, k), torch.int8, output_dim=0, input_dim=1),
        "input_scale": scale_spec("input_scale", (1,), per_shard_scalar=True),
        # upstream declares the offset int8; files hold its integer value as float32 (v1) or model dtype (v0)
        "input_offset": TensorSpec(
            "input_offset", (1,), torch.float32, accepted_dtypes=(*FLOAT_DTYPES[1:], torch.int8), per_shard_scalar=True
        ),
        "quant_bias": TensorSpec("quant_bias", (n,), torch.int32, output_dim=0),
        "deq_scale": TensorSpec("deq_scale", (n,), deq_dtypes[0], accepted_dtypes=deq_dtypes[1:], output_dim=0),
        "weight_scale": scale_spec("weight_scale", (n, 1), output_dim=0, optional=True),
        "weight_offset": scale_spec("weight_offset", (n, 1), output_dim=0, optional=True),
    }


def check_input_offset(offset: torch.Tensor, layer: str, name: str = "input_offset") -> torch.Tensor:
    """``offset`` as float32, or an error unless it is a finite integer in the int8 range."""
    o = check_scale(offset, name, layer, positive=False)
    lo, hi = INT8_RANGE
    if not (torch.equal(o, torch.round(o)) and ((o >= lo) & (o <= hi)).all()):
        raise CheckpointTensorError(
            f"tensor {layer + '.' if layer else ''}{name} is {o.tolist()}, expected an integer in [{lo}, {hi}] "
            "(the int8 zero point of the activations). The checkpoint is corrupted or not a static W8A8 layer."
        )
    return o


def static_int8_tensors(tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    """Validated canonical tensors of the static path (see ``kernels/int8_static.py``)."""
    return {
        "weight": tensors["weight"],
        "input_scale": check_scale(tensors["input_scale"], "input_scale", layer),
        "input_offset": check_input_offset(tensors["input_offset"], layer),
        "quant_bias": tensors["quant_bias"],
        "deq_scale": check_scale(as_float32(tensors["deq_scale"]), "deq_scale", layer),
    }


def activation_params(calibration: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_scale, input_offset)`` float32 ``[1]`` from the calibration kwargs of ``quantize_weights``."""
    given = set(calibration)
    unknown = given - {"input_scale", "input_offset", "act_min", "act_max"}
    if unknown:
        raise CheckpointTensorError(
            f"unknown calibration argument(s) {', '.join(sorted(unknown))}; static W8A8 takes input_scale "
            "[, input_offset] or act_min and act_max."
        )
    if "input_scale" in given and not given & {"act_min", "act_max"}:
        scale = torch.as_tensor(calibration["input_scale"], dtype=torch.float32).reshape(-1)
        offset = torch.as_tensor(calibration.get("input_offset", 0.0), dtype=torch.float32).reshape(-1)
        if scale.numel() != 1 or offset.numel() != 1:
            raise CheckpointTensorError(
                f"calibration input_scale / input_offset must be single values (per-tensor), got "
                f"{scale.numel()} and {offset.numel()} elements."
            )
        return check_scale(scale, "input_scale", "calibration"), check_input_offset(offset, "calibration")
    if given == {"act_min", "act_max"}:
        act_min, act_max = float(calibration["act_min"]), float(calibration["act_max"])
        if not (math.isfinite(act_min) and math.isfinite(act_max) and act_min <= act_max):
            raise CheckpointTensorError(f"calibration range act_min={act_min}, act_max={act_max} is not a range.")
        lo, hi = min(act_min, 0.0), max(act_max, 0.0)
        qlo, qhi = INT8_RANGE
        scale = torch.tensor([(hi - lo) / (qhi - qlo) or 1.0], dtype=torch.float32)  # all-zero range: any scale
        offset = torch.clamp(torch.round(qlo - lo / scale), qlo, qhi)
        return scale, offset
    raise CheckpointTensorError(
        f"static W8A8 needs the activation range to quantize a layer: pass input_scale (and input_offset), or "
        f"act_min and act_max, as calibration keyword arguments (got {', '.join(sorted(given)) or 'none'})."
    )


def quantize_static_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, calibration: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The W8A8 v1 tensors for a float layer, and its per-channel weight scale ``[N, 1]`` (for W8A8_MIX)."""
    s_in, o_in = activation_params(calibration)
    q, s_w, _ = quantize_weight_per_channel(weight, bits=8, symmetric=True)
    # All-zero rows: any positive scale works for the weight; the smallest real one keeps their bias resolution.
    nonzero = q.any(dim=1, keepdim=True)
    s_w = torch.where(nonzero, s_w, s_w[nonzero].min() if nonzero.any() else torch.ones(()))
    deq = (s_in * s_w).flatten()
    b = torch.zeros(q.shape[0], dtype=torch.float64) if bias is None else bias.double()
    quant_bias = torch.round(b / deq.double()) - o_in.double() * q.double().sum(dim=1)
    if not (torch.isfinite(quant_bias).all() and quant_bias.abs().max() <= INT32_MAX):
        raise CheckpointTensorError(
            "quant_bias = round(bias / deq_scale) - input_offset · Σ W_q does not fit int32: the bias is too large "
            "for this layer's weight and activation scales (or the calibration range is degenerate)."
        )
    tensors = {
        "weight": q,
        "input_scale": s_in,
        "input_offset": o_in,
        "quant_bias": quant_bias.to(torch.int32),
        "deq_scale": encode_scale_int64(deq) if weight.dtype == torch.float16 else deq,
    }
    return tensors, s_w


@register_scheme("W8A8", "linear")
class W8A8Linear(KernelLinearScheme):
    quant_type = "W8A8"
    KERNELS = INT8_STATIC_KERNELS

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        return static_int8_specs(in_features, out_features, params_dtype)

    def quantize_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: Any):
        return quantize_static_linear(weight, bias, calibration)[0]

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return static_int8_tensors(tensors, layer)
