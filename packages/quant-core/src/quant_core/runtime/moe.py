"""Routed experts: transformers' fused experts modules (``Qwen3MoeExperts`` and its kin) fed from msModelSlim's
per-expert tensors, quantized (``QuantExperts``, a MoE scheme) or float (stacked into the module's own params).

transformers 5 keeps experts as ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``
and calls ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` after its router; that is
exactly the MoE schemes' ``apply(runtime, x, topk_weights, topk_ids)`` on the stacked ``w13`` / ``w2`` layout.
"""

import inspect
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from quant_core.errors import CheckpointTensorError, UnsupportedSchemeError
from quant_core.moe import stack_experts
from quant_core.schemes.base import MoEScheme

PROJECTION_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # Qwen/DeepSeek, Mixtral
ROUTED_ARGS = ["hidden_states", "top_k_index", "top_k_weights"]


class QuantExperts(nn.Module):
    """Replaces a fused experts module: ``forward(hidden_states, top_k_index, top_k_weights)`` runs
    ``scheme.apply(runtime, hidden_states, top_k_weights, top_k_index)``. ``runtime`` is a plain attribute (see
    :class:`~quant_core.runtime.QuantLinear`)."""

    def __init__(self, scheme: MoEScheme, runtime: Mapping[str, Any], num_experts: int) -> None:
        super().__init__()
        self.scheme = scheme
        self.runtime = runtime
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self.scheme.apply(self.runtime, hidden_states, top_k_weights, top_k_index)

    def extra_repr(self) -> str:
        return f"{self.scheme.quant_type}, num_experts={self.num_experts}"


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding all experts as 3-D parameters (``[E, ...]``), rather than one ``nn.Linear`` per expert."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def check_servable(module: nn.Module, prefix: str) -> None:
    """Raise unless ``module`` is a fused experts module this runtime can feed from per-expert tensors."""
    params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    problems = []
    if set(params) != {"gate_up_proj", "down_proj"}:
        problems.append(f"its parameters are {', '.join(params)} (expected gate_up_proj and down_proj only)")
    layout = {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False}
    problems += [f"{attr}={getattr(module, attr)}" for attr, want in layout.items()
                 if getattr(module, attr, want) != want]  # fmt: skip
    act = getattr(getattr(module, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"activation {act!r} (the MoE schemes compute SwiGLU)")
    args = list(inspect.signature(module.forward).parameters)
    if args != ROUTED_ARGS:
        problems.append(f"forward takes ({', '.join(args)}), expected ({', '.join(ROUTED_ARGS)})")
    if problems:
        raise UnsupportedSchemeError(
            f"MoE experts module {prefix!r} is a {type(module).__name__}, which the quant-core runtime cannot serve "
            f"from per-expert checkpoint tensors: {'; '.join(problems)}. Supported: transformers' fused SwiGLU experts "
            "(e.g. Qwen3MoeExperts). Serve this model with vLLM, or extend quant_core.runtime.moe."
        )


def expert_tensor_names(prefix: str, names: Collection[str]) -> tuple[list[str], tuple[str, ...]]:
    """The checkpoint names ``<prefix>.<e>.<projection>.<suffix>``, and which projection naming they use."""
    for projections in PROJECTION_NAMES:
        pattern = re.compile(rf"{re.escape(prefix)}\.\d+\.({'|'.join(projections)})\.[^.]+")
        found = [n for n in names if pattern.fullmatch(n)]
        if found:
            return found, projections
    return [], PROJECTION_NAMES[0]


def stacked_experts(
    tensors: Mapping[str, torch.Tensor], projections: tuple[str, ...], prefix: str, num_experts: int
) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> ``w13_*`` / ``w2_*``, checked to hold exactly ``num_experts`` experts."""
    stacked = stack_experts(tensors, projections=projections, layer=prefix.removesuffix(".experts"))
    found = next(iter(stacked.values())).shape[0]
    if found != num_experts:
        raise CheckpointTensorError(
            f"{prefix}: the checkpoint has {found} experts (experts.0 .. experts.{found - 1}), config.json says "
            f"{num_experts}. The checkpoint does not belong to this config."
        )
    return stacked


def load_float_experts(module: nn.Module, stacked: Mapping[str, torch.Tensor], prefix: str, dtype) -> None:
    """Put stacked float ``w13_weight`` / ``w2_weight`` into the module's ``gate_up_proj`` / ``down_proj``."""
    unexpected = sorted(set(stacked) - {"w13_weight", "w2_weight"})
    if unexpected:
        raise CheckpointTensorError(
            f"float MoE layer {prefix!r} has per-expert tensors {', '.join(unexpected)} besides the weights; the "
            "description says these experts are FLOAT, so the description or the checkpoint is wrong."
        )
    for name, key in (("gate_up_proj", "w13_weight"), ("down_proj", "w2_weight")):
        want = tuple(getattr(module, name).shape)
        if key not in stacked or tuple(stacked[key].shape) != want:
            got = tuple(stacked[key].shape) if key in stacked else "nothing"
            raise CheckpointTensorError(
                f"{prefix}.{name}: the per-expert checkpoint tensors stack to {got}, the model expects {want}. "
                "The checkpoint does not belong to this config."
            )
        setattr(module, name, nn.Parameter(stacked[key].to(dtype), requires_grad=False))
