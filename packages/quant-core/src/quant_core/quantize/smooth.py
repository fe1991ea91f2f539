"""SmoothQuant-style smoothing (Xiao et al., 2023), folded into the existing RMSNorm and linear weights.

A *smoothing group* is an RMSNorm and the linears that read its output: ``input_layernorm`` -> q/k/v_proj and
``post_attention_layernorm`` -> gate/up_proj of a dense MLP. With ``X_j`` the norm's output channel j over the
calibration tokens and ``W_j`` column j of every linear of the group,

    s_j = max|X_j|^α / max|W_j|^(1-α),    norm.weight /= s,    W[:, j] *= s_j  (each linear of the group),

which leaves ``X W^T`` unchanged while moving the activation outliers into the weights, where per-channel int8
handles them. Nothing new is written: the norm weight keeps its dtype and the linears are quantized from the
scaled weights. Because the new norm weight is rounded to the checkpoint dtype (bf16), the linears are scaled by
the *effective* factor ``old_norm / new_norm`` instead of ``s``, so the written float model equals the smoothed
one exactly (before quantization).

A second kind of group, ``up_proj -> down_proj`` (``smooth_down``, msModelSlim's and AWQ's linear-linear pair):
down_proj reads ``act(gate_proj(x)) · up_proj(x)``, which is linear in up_proj's output, so dividing up_proj's
*row* j by ``s_j`` and multiplying down_proj's column j by ``s_j`` leaves the MLP unchanged. down_proj's input has
the model's largest outliers (the first token's "massive activations" run into the thousands on small Llamas), which
no norm can absorb; this pair is what makes static per-tensor W8A8 usable on such models. Row scaling does not change
up_proj's quantization error (its per-row / per-group scales scale with it).

A third, on request (``smooth_head``): the final norm -> a quantized ``lm_head`` (a tied head is quantized as its own
tensors, ``QuantPlan.untied_head``, so scaling its columns leaves the embedding table alone). Its strength is its
own: the head's input has other outliers than the decoder layers' (SmolLM2 W8A8_DYNAMIC head, 4k Wikipedia tokens,
fake-quantized: PPL ratio to float +0.0073 unsmoothed, +0.0026 at 0.3, +0.0081 at 0.5).

Skipped groups: a norm whose linears are not all quantized (nothing to gain), and MoE blocks, whose
``post_attention_layernorm`` also feeds the router (and, in transformers 5, fused 3-D expert parameters); smoothing
those would have to scale the float router too. Model types other than the Llama / Qwen / Mistral families are
refused, since their norms may not be a plain ``x / rms(x) · weight`` (Gemma's ``1 + weight``, LayerNorm bias, ...).
"""

from dataclasses import dataclass, field

import torch

from quant_core.errors import QuantCoreError
from quant_core.quant_types import FLOAT
from quant_core.quantize.calibrate import FloatModel
from quant_core.quantize.plan import QuantPlan
from quant_core.quantize.source import SourceCheckpoint

SMOOTHABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe"})
# norm name -> linears reading its output, under one decoder layer prefix
GROUP_LAYOUT = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
# a post_attention_layernorm that also feeds these is an MoE block: not smoothed
OTHER_READERS = ("mlp.gate", "mlp.router", "mlp.experts", "mlp.shared_expert")
FINAL_NORM = "model.norm"  # the norm before lm_head (Llama / Qwen / Mistral)
MIN_SCALE = 1e-5  # SmoothQuant's clamp: no factor (nor absmax) below this


@dataclass(frozen=True)
class SmoothGroup:
    norm: str  # module prefix whose output is divided by s: an RMSNorm (e.g. ...input_layernorm) or, with
    # ``rows``, a linear (up_proj: its weight rows)
    linears: tuple[str, ...]
    rows: bool = False
    alpha: float | None = None  # None: smooth_model's alpha


@dataclass
class Smoothing:
    """What smoothing changed: the new norm weights (checkpoint dtype) and each linear's column factors (fp32)."""

    alpha: float
    norms: dict[str, torch.Tensor]  # "<norm>.weight" -> new weight
    column_scales: dict[str, torch.Tensor]  # linear prefix -> [K] factors its weight columns were multiplied by
    skipped: list[str]  # norms left alone, with the reason
    row_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # up_proj prefix -> [N] row factors

    def weight(self, prefix: str, weight: torch.Tensor) -> torch.Tensor:
        """The smoothed float32 weight of linear ``prefix`` (unchanged if it is in no smoothed group)."""
        cols, rows = self.column_scales.get(prefix), self.row_scales.get(prefix)
        if cols is not None:
            weight = weight.float() * cols
        return weight if rows is None else weight.float() * rows[:, None]


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise QuantCoreError(
            f"smoothing strength alpha must be a number in (0, 1), e.g. 0.5 (SmoothQuant's default), got {alpha!r}."
        )
    return float(alpha)


def smoothing_groups(source: SourceCheckpoint, plan: QuantPlan, model_type: str) -> tuple[list[SmoothGroup], list[str]]:
    """The groups to smooth, and the norms skipped with why."""
    if model_type not in SMOOTHABLE_MODEL_TYPES:
        raise QuantCoreError(
            f"smoothing supports model types {', '.join(sorted(SMOOTHABLE_MODEL_TYPES))} (RMSNorm · weight followed "
            f"by q/k/v and gate/up projections); {source.model_dir} is {model_type!r}. Quantize without --smooth."
        )
    groups, skipped = [], []
    for name in source.tensors:
        layer, _, norm = name.removesuffix(".weight").rpartition(".")
        if not name.endswith(".weight") or norm not in GROUP_LAYOUT:
            continue
        linears = tuple(f"{layer}.{proj}" for proj in GROUP_LAYOUT[norm])
        prefix = f"{layer}.{norm}"
        if any(p not in plan.linears for p in linears):
            others = [p for p in OTHER_READERS if any(n.startswith(f"{layer}.{p}.") for n in source.tensors)]
            skipped.append(f"{prefix} (feeds {', '.join(others) or 'other layers'}: MoE blocks are not smoothed)")
        elif any(plan.linears[p].quant_type == FLOAT for p in linears):
            skipped.append(f"{prefix} (its linears stay FLOAT)")
        else:
            groups.append(SmoothGroup(prefix, linears))
    return groups, skipped


def down_smoothing_groups(
    source: SourceCheckpoint, plan: QuantPlan, model_type: str, alpha: float
) -> tuple[list[SmoothGroup], list[str]]:
    """The ``mlp.up_proj -> mlp.down_proj`` pairs of dense MLPs to smooth with ``alpha``, and the pairs skipped."""
    if model_type not in SMOOTHABLE_MODEL_TYPES:
        raise QuantCoreError(
            f"down_proj smoothing supports model types {', '.join(sorted(SMOOTHABLE_MODEL_TYPES))} (gated MLPs, "
            f"down_proj(act(gate_proj(x)) · up_proj(x))); {source.model_dir} is {model_type!r}. Drop --smooth-down."
        )
    groups, skipped = [], []
    for name in source.tensors:
        if not name.endswith(".mlp.down_proj.weight"):
            continue
        down = name.removesuffix(".weight")
        up = down.removesuffix("down_proj") + "up_proj"
        if up not in plan.linears or down not in plan.linears:
            skipped.append(f"{down} (no {up} beside it)")
        elif FLOAT in (plan.linears[up].quant_type, plan.linears[down].quant_type):
            skipped.append(f"{down} (it or {up} stays FLOAT)")
        elif plan.linears[up].has_bias:
            skipped.append(f"{down} ({up} has a bias)")
        else:
            groups.append(SmoothGroup(up, (down,), rows=True, alpha=alpha))
    return groups, skipped


def head_smoothing_groups(
    source: SourceCheckpoint, plan: QuantPlan, model_type: str, alpha: float
) -> tuple[list[SmoothGroup], list[str]]:
    """The final norm -> quantized ``lm_head`` pair, smoothed with ``alpha``; refused when the head is not quantized."""
    heads = [layer for layer in plan.quantized if layer.always_float == "lm_head"]
    if not heads:
        raise QuantCoreError(
            "smooth_head smooths the final norm into a quantized lm_head, and no rule quantizes lm_head itself (a "
            "head tied to a quantized embedding runs the table, which cannot be scaled for the head alone). Add "
            "--layer-scheme lm_head=W8A8_DYNAMIC, or drop smooth_head."
        )
    if model_type not in SMOOTHABLE_MODEL_TYPES:
        raise QuantCoreError(
            f"head smoothing supports model types {', '.join(sorted(SMOOTHABLE_MODEL_TYPES))} (a final RMSNorm "
            f"'{FINAL_NORM}' before lm_head); {source.model_dir} is {model_type!r}. Drop smooth_head."
        )
    if f"{FINAL_NORM}.weight" not in source.tensors:
        return [], [f"{heads[0].prefix} (no {FINAL_NORM}.weight before it)"]
    return [SmoothGroup(FINAL_NORM, (heads[0].prefix,), alpha=alpha)], []


def smooth_model(session: FloatModel, groups: list[SmoothGroup], alpha: float, norm_dtype: dict[str, torch.dtype]):
    """Collect each group's activation absmax on the calibration samples, then smooth ``session.model`` in place.

    ``norm_dtype`` maps each ``<norm>.weight`` to its checkpoint dtype (the new norm weight is rounded to it); row
    groups (``up_proj -> down_proj``) need no entry. Returns the :class:`Smoothing` the writer applies to the
    checkpoint tensors."""
    absmax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)

    # the first linear's input is what gets quantized (for a norm group: the norm's output)
    handles = [
        session.module(g.linears[0]).register_forward_pre_hook(lambda _m, args, name=g.norm: observe(name, args[0]))
        for g in groups
    ]
    try:
        session.run(desc="smoothing statistics")
    finally:
        for handle in handles:
            handle.remove()

    norms, column_scales, row_scales = {}, {}, {}
    with torch.no_grad():
        for g in groups:
            if g.norm not in absmax:
                raise QuantCoreError(f"smoothing: {g.norm} never ran on the calibration samples; add samples.")
            norm = session.module(g.norm)
            linears = [session.module(p) for p in g.linears]
            w_absmax = torch.stack([m.weight.abs().amax(0) for m in linears]).amax(0)
            s = smoothing_factors(absmax[g.norm], w_absmax, alpha if g.alpha is None else g.alpha)
            if g.rows:  # up_proj rows / s, down_proj columns * s: both quantized from fp32, no rounding to track
                norm.weight.div_(s[:, None])
                row_scales[g.norm] = 1 / s
                for p, m in zip(g.linears, linears, strict=True):
                    m.weight.mul_(s)
                    column_scales[p] = s
                continue
            old = norm.weight.detach().float()
            new = (old / s).to(norm_dtype[f"{g.norm}.weight"])
            effective = torch.where(new.float() != 0, old / new.float(), torch.ones_like(old))
            norm.weight.copy_(new.float())
            for p, m in zip(g.linears, linears, strict=True):
                m.weight.mul_(effective)
                column_scales[p] = effective
            norms[f"{g.norm}.weight"] = new
    return Smoothing(alpha, norms, column_scales, [], row_scales)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)``, clamped away from 0 as SmoothQuant does."""
    act = act_absmax.float().clamp_min(MIN_SCALE)
    weight = weight_absmax.float().clamp_min(MIN_SCALE)
    return (act.pow(alpha) / weight.pow(1 - alpha)).clamp_min(MIN_SCALE)
