"""MoE helpers shared by every MoE scheme: stacking msModelSlim's per-expert tensors, and token routing.

msModelSlim writes experts unfused, ``<moe>.experts.<e>.{gate,up,down}_proj.<suffix>``. MoE schemes work on the
stacked layout vLLM uses: ``w13_<suffix>`` ``[E, ...]`` with each expert's gate rows first and its up rows second,
and ``w2_<suffix>`` ``[E, ...]`` from ``down_proj``.
"""

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from quant_core.errors import CheckpointTensorError

_EXPERT_KEY = re.compile(r"(?:^|\.)experts\.(\d+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")


def stack_experts(
    tensors: Mapping[str, torch.Tensor],
    *,
    projections: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
    layer: str = "",
) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> stacked ``w13_*`` / ``w2_*`` tensors.

    ``tensors`` holds keys ending in ``experts.<e>.<projection>.<suffix>`` (any leading prefix). ``projections``
    names gate, up and down (Mixtral-style checkpoints: ``("w1", "w3", "w2")``). Every expert must provide every
    suffix with one shape, else :class:`CheckpointTensorError` names what is missing or off.
    """
    gate, up, down = projections
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        match = _EXPERT_KEY.search(key)
        if match and match.group(2) in projections:
            found[(match.group(2), match.group(3))][int(match.group(1))] = tensor
    if not found:
        raise CheckpointTensorError(
            f"{layer or 'MoE layer'}: no tensors named like 'experts.<e>.{gate}.<suffix>' among "
            f"{', '.join(sorted(tensors)[:5])}{', ...' if len(tensors) > 5 else ''}."
        )
    num_experts = 1 + max(e for per_expert in found.values() for e in per_expert)
    suffixes = sorted({suffix for _, suffix in found})
    where = f"{layer}." if layer else ""

    def stacked(proj: str, suffix: str) -> torch.Tensor:
        per_expert = found.get((proj, suffix), {})
        missing = [e for e in range(num_experts) if e not in per_expert]
        if missing:
            raise CheckpointTensorError(
                f"{where}experts.{missing[0]}.{proj}.{suffix} is missing ({len(missing)} of {num_experts} experts lack "
                f"'{proj}.{suffix}'); every expert needs the same tensors."
            )
        shapes = {tuple(t.shape) for t in per_expert.values()}
        if len(shapes) > 1:
            raise CheckpointTensorError(
                f"{where}experts.*.{proj}.{suffix}: experts disagree on shape {sorted(shapes)}."
            )
        return torch.stack([per_expert[e] for e in range(num_experts)])

    out = {}
    for suffix in suffixes:
        if (gate, suffix) in found or (up, suffix) in found:
            out[f"w13_{suffix}"] = torch.cat((stacked(gate, suffix), stacked(up, suffix)), dim=1)
        if (down, suffix) in found:
            out[f"w2_{suffix}"] = stacked(down, suffix)
    return out


def check_routing(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``x [T, H]``, ``topk_weights``/``topk_ids [T, k]`` fit ``num_experts`` experts."""
    if x.dim() != 2:
        raise ValueError(f"MoE input must be [tokens, hidden], got shape {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
            f"[tokens={x.shape[0]}, k]"
        )
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= num_experts):
        raise ValueError(
            f"topk_ids holds expert ids in [{int(topk_ids.min())}, {int(topk_ids.max())}] but this layer has "
            f"{num_experts} experts (ids 0..{num_experts - 1}); the router and the checkpoint disagree on the "
            "expert count (expert parallelism must map global ids to local ones first)."
        )


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, counts)``: the ``T·k`` (token, slot) pairs sorted by expert (stable), and rows per expert."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts
