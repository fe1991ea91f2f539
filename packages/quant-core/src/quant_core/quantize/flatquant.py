"""FlatQuant calibration (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", ICML 2025) for the
``*_FLATQUANT_DYNAMIC`` schemes, on CPU, one decoder layer at a time.

Each *group* of linears reading one input gets an invertible Kronecker transform ``P = L ⊗ R``, a per-channel
scale ``c`` where it can be folded away, and an activation clip ratio; each linear gets a weight clip ratio per
output channel:

============  =============================  ==========================  =========================================
group         input                          scale ``c`` folded into     ``L ⊗ R`` (sizes)
============  =============================  ==========================  =========================================
q/k/v         input_layernorm output         input_layernorm weight      ``get_decompose_dim(hidden)``, online
o_proj        attention output               –                           ``[num_heads] ⊗ [head_dim]``: ``L``
                                                                         online, ``R`` folded into v_proj's output
                                                                         (msModelSlim's layout, schemes that allow
                                                                         a missing ``right_trans``); W4A4:
                                                                         ``get_decompose_dim``, both online
gate/up       post_attention_layernorm out   the norm weight             ``get_decompose_dim(hidden)``, online
down_proj     ``silu(gate) · up``            up_proj's rows              ``get_decompose_dim(intermediate)``
============  =============================  ==========================  =========================================

The quantized layer computes what the schemes compute at run time (``kernels/flatquant.py``): per token
``x̃ = (x / c) · (L ⊗ R)`` (``Lᵀ · X · R`` on ``X = x.view(a, b)``), ``s_tok = clip · amax|x̃| / 7`` (int4; int8
activations use ``amax / 127`` and ignore the clip ratio, as the W8A8/W4A8 FlatQuant kernels do, so 1.0 is
written), weights ``W' = (W · diag(c)) · (L ⊗ R)^-T`` (the scheme's own ``fold_inverse_transform``) clipped per
row to ``± clip_n · amax|W'_n|``, then the scheme's ``quantize_inner`` (per-channel RTN, so ``s = clip_n · amax /
qmax``) or GPTQ on the same grid.

Recipe, adapted from the paper to a small CPU budget:

* Calibration text -> ``samples`` windows of ``seq_len`` tokens (documents concatenated, so no padding).
* Layer by layer: the float layer's output on the *float* inputs is the target, and the next layer's inputs are
  those float outputs, as the paper's code does: each layer is fitted against exactly the function it replaces.
  (``quantized_inputs=True`` fits on the quantized model's inputs instead, OmniQuant-style; it cost one more pass
  per layer and did not help on SmolLM2-135M: W4A4 perplexity 41.5 vs 40.3.)
* ``L``, ``R`` start as Hadamard matrices with random row signs (random orthogonal where :func:`hadamard` knows
  no matrix of that order; ``init="random"``: random orthogonal everywhere), fixed seed: the inverse is exact and
  well conditioned, and the rotation spreads activation outliers from the first step, which the few dozen steps a
  CPU budget allows could not learn from the identity (SmolLM2-135M layer-output MSE: identity RTN 6-25x the
  rotated start). ``L ⊗ R`` of two Hadamard matrices is one of order ``K``: every input channel spreads evenly
  over all ``K``, where a random rotation leaves some concentrated (SmolLM2-135M W4A4, 4k-token wiki perplexity
  ratio 1.41 -> 1.32 from this alone). ``c`` is ``exp`` of a parameter (steps are relative, it cannot reach 0)
  starting SmoothQuant-style, ``max|X|^α / max|W|^(1-α)`` with α = 0.5 (better than 0.3 or no scale). Clip
  ratios are ``sigmoid(θ)``: activations start at θ = 2.5 (0.92), each weight row at its MSE-optimal ratio on the
  initial transformed weight (:func:`mse_weight_clip`, typically 0.65-0.8 for int4; ratio 1.28 vs 1.31 from 2.5),
  which the training would otherwise spend its first steps walking to. Only with the token weights below: with
  plain MSE it clipped the weights that build the attention sink's massive activation (layer 11's MSE 10x).
* AdamW (no weight decay; lr 2e-2 for ``L``, ``R``, ``log c``, 0.3 for the clip logits), cosine schedule, MSE of
  the decoder layer's output against the float output, straight-through rounding; inverses recomputed every
  step (``torch.linalg.inv`` of ``a × a`` and ``b × b``). One 256-token window per step: the training is
  step-bound, and 4x the steps of 1024-token batches cost about 1.3x the time (ratio 1.41 -> 1.33 alone).
* The attention sink (each window's first token) gets a massive activation in a few layers (SmolLM2-135M layer
  11: its output changes by a norm of ~2e4), which made ~90 % of that layer's squared error at a relative error
  of 1e-3: plain MSE fits that one token, and one-window steps made layers 11 and 28 diverge (ratio 1.37). So
  each token's squared error is weighted ``min(1, cap · median|Δ|² / |Δ_t|²)``, ``Δ`` the float layer's output
  change, ``cap = token_cap`` (100): no token counts more than a token changing ``√cap`` times the median
  (:func:`token_weights`; ratio 1.28 with it).
* Measured on SmolLM2-135M (token perplexity ratio to float over 4k wiki tokens, reference kernels): these
  defaults on 32 x 256 tokens 1.28 in ~6.5 min on one core, 1.5 GiB (the first recipe: random start, 1024-token
  steps, plain MSE: 1.41; round-to-nearest W4A4_DYNAMIC: 484).
* Then GPTQ (:mod:`~quant_core.quantize.gptq`, the scheme's integer grid) on each clipped, transformed weight with
  the Hessian of its group's transformed input, where the calibration has at least
  ``GPTQ_MIN_TOKENS_PER_INPUT × K`` tokens (else RTN). Last, one pass records each quantized layer's output MSE
  (``FlatQuantResult.final``; the written checkpoint reproduces it layer by layer, checked on SmolLM2-135M).

Linears of the layer with other schemes run in float during the fit. Supported layouts: the Llama family
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``); scales are folded only into plain RMSNorms
(:data:`~quant_core.quantize.smooth.SMOOTHABLE_MODEL_TYPES`) and dense MLPs.

Cost: ``epochs × samples × seq_len`` tokens through each decoder layer forward and backward, plus a float pass, a
Hessian pass and a final pass; memory: a few ``[samples, seq_len, hidden]`` float32 activations besides the model.
Threads: see :func:`fastest_threads`.
"""

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from quant_core.errors import QuantCoreError
from quant_core.primitives import get_decompose_dim, int_range
from quant_core.quantize.calibrate import FloatModel
from quant_core.quantize.gptq import Grid, HessianAccumulator, checkpoint_tensors, gptq_quantize
from quant_core.quantize.layerwise import (
    batch_kwargs,
    calibration_windows,
    capture_inputs,
    decoder_stack,
    layer_outputs,
    run_layer,
)
from quant_core.quantize.plan import LinearLayer, QuantPlan
from quant_core.quantize.smooth import MIN_SCALE, SMOOTHABLE_MODEL_TYPES, smoothing_factors
from quant_core.quantize.source import SourceCheckpoint
from quant_core.registry import scheme_class
from quant_core.schemes._flatquant import fold_inverse_transform
from quant_core.spec import check_tensors

# quant type -> (activation bits, weight bits)
FLATQUANT_BITS = {"W4A4_FLATQUANT_DYNAMIC": (4, 4), "W8A8_FLATQUANT_DYNAMIC": (8, 8), "W4A8_FLATQUANT_DYNAMIC": (8, 4)}
FLATQUANT_SCHEMES = frozenset(FLATQUANT_BITS)
# GPTQ runs on each FlatQuant scheme's inner integer grid: int4 / int8 symmetric per row
GPTQ_GRID = {"W4A4_FLATQUANT_DYNAMIC": "W4A4_DYNAMIC", "W8A8_FLATQUANT_DYNAMIC": "W8A16",
             "W4A8_FLATQUANT_DYNAMIC": "W4A8_DYNAMIC"}  # fmt: skip
# GPTQ trusts the Hessian in every direction: with fewer calibration tokens than a few times K it is rank-deficient
# and GPTQ does worse than RTN (measured on msModelSlim's 8-prompt compat case: logit error 21 % vs 15 %)
GPTQ_MIN_TOKENS_PER_INPUT = 4
CLIP_INIT = 2.5  # sigmoid(2.5) = 0.92
INITS = ("hadamard", "random")
SCALE_ALPHA = 0.5
SEED = 0
LAYOUT = {  # group -> (input module, linears) under one decoder layer
    "qkv": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o": (None, ("self_attn.o_proj",)),
    "gate_up": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "down": (None, ("mlp.down_proj",)),
}


@dataclass(frozen=True)
class FlatQuantConfig:
    """Training options; ``epochs=0`` writes the initial transforms (rotations, SmoothQuant-style scales, clips)."""

    epochs: int = 2
    lr: float = 2e-2
    clip_lr: float = 3e-1  # clip logits need large steps to reach their optimum (0.65-0.8) in a few dozen steps
    batch_tokens: int = 256  # tokens per optimizer step (whole windows, at least one)
    init: str = "hadamard"  # initial L, R: "hadamard" (random signs) or "random" orthogonal
    token_cap: float | None = 100.0  # loss weights, see token_weights (None: plain MSE)
    clip_search: bool = True  # start each weight clip at its row's MSE-optimal ratio (else sigmoid(CLIP_INIT))
    gptq: bool = True  # GPTQ on the transformed weights instead of round-to-nearest with the learned clip
    quantized_inputs: bool = False  # fit each layer on the quantized model's inputs (default: the float model's)

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise QuantCoreError(f"FlatQuant epochs must be a non-negative integer, got {self.epochs!r}.")
        if not (self.lr > 0 and self.clip_lr > 0 and self.batch_tokens > 0):
            raise QuantCoreError(f"FlatQuant lr, clip_lr and batch_tokens must be positive, got {self}.")
        if self.token_cap is not None and not self.token_cap > 0:
            raise QuantCoreError(f"FlatQuant token_cap must be positive or None, got {self.token_cap!r}.")
        if self.init not in INITS:
            raise QuantCoreError(f"FlatQuant init must be one of {INITS}, got {self.init!r}.")


# --- what the writer needs ---------------------------------------------------------------------------------------
@dataclass
class LinearTransform:
    """One linear's learned FlatQuant parameters (float32), enough to write its checkpoint tensors."""

    quant_type: str
    left: torch.Tensor  # [a, a]
    right: torch.Tensor  # [b, b], folded into the weight; written as right_trans only if write_right
    write_right: bool
    clip_ratio: float  # activation clip (1.0 where the runtime ignores it)
    weight_clip: torch.Tensor  # [N] in (0, 1]
    column_scale: torch.Tensor | None = None  # [K] weight columns × c (c divides the norm / up_proj rows)
    row_scale: torch.Tensor | None = None  # [N] weight rows and bias × this (up_proj: 1 / down_proj's c)
    out_right: torch.Tensor | None = None  # [d, d] v_proj: each head's output × R (o_proj's right factor)
    inner: dict[str, torch.Tensor] | None = None  # GPTQ: the inner scheme's tensors (else RTN at write time)

    def float_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The float weight the online transform is folded into: the model's function is unchanged by these."""
        w = weight.float()
        if self.column_scale is not None:
            w = w * self.column_scale
        if self.row_scale is not None:
            w = w * self.row_scale[:, None]
        if self.out_right is not None:
            d = self.out_right.shape[0]
            w = (self.out_right.T @ w.reshape(-1, d, w.shape[1])).reshape(w.shape)
        return w

    def float_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None
        b = bias.float()
        if self.row_scale is not None:
            b = b * self.row_scale
        if self.out_right is not None:
            b = (b.reshape(-1, self.out_right.shape[0]) @ self.out_right).reshape(-1)
        return b.to(bias.dtype)

    def clipped_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The float weight with the inverse transform folded in (the scheme's float64 fold), clipped per row."""
        folded = fold_inverse_transform(self.float_weight(weight), self.left, self.right)
        limit = self.weight_clip[:, None] * folded.abs().amax(1, keepdim=True)
        return torch.minimum(torch.maximum(folded, -limit), limit)

    def scheme_options(self) -> dict:
        return {"left_dim": self.left.shape[0]} | ({} if self.write_right else {"has_right_trans": False})


@dataclass
class FlatQuantResult:
    linears: dict[str, LinearTransform] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # "<norm>.weight" -> new weight (checkpoint dtype)
    losses: list[tuple[float, float]] = field(default_factory=list)  # per layer: (first, last) epoch's mean MSE
    seconds: float = 0.0
    windows: tuple[int, int] = (0, 0)  # (samples, tokens per sample) actually used
    final: list[float] = field(default_factory=list)  # per layer: the quantized layer's output MSE (after GPTQ)
    rtn: list[str] = field(default_factory=list)  # groups (first linear) left to RTN: too few tokens for GPTQ

    def note(self, config: FlatQuantConfig) -> str:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        ratios = sorted(last / first for first, last in self.losses if first > 0)
        trend = f"; layer-output MSE last/first epoch: median {ratios[len(ratios) // 2]:.2f}" if len(ratios) else ""
        rtn = ""
        if config.gptq and self.rtn:
            rtn = (f"; RTN instead of GPTQ for {len(self.rtn)} input groups (e.g. {self.rtn[0]}): fewer than "
                   f"{GPTQ_MIN_TOKENS_PER_INPUT}x in_features calibration tokens")  # fmt: skip
        return (
            f"FlatQuant: {len(self.linears)} linears in {len(self.losses)} decoder layers, {config.epochs} epoch(s) "
            f"on {self.windows[0]} x {self.windows[1]} tokens in {self.seconds:.0f} s (peak RSS so far "
            f"{peak:.2f} GiB){trend if config.epochs > 1 else ''}{rtn}"
        )


def quantize_linear(plan: QuantPlan, layer: LinearLayer, fq: LinearTransform, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:  # fmt: skip
    """The checkpoint tensors of a calibrated FlatQuant linear (checked against its scheme's specs) and its bias."""
    scheme = plan.scheme_for(layer, **fq.scheme_options())
    with torch.no_grad():
        inner = fq.inner if fq.inner is not None else scheme.quantize_inner(fq.clipped_weight(weight))
        tensors = {**inner, "left_trans": fq.left.clone(), "clip_ratio": torch.tensor([fq.clip_ratio])}
        if fq.write_right:
            tensors["right_trans"] = fq.right.clone()
    check_tensors(scheme.weight_specs(layer.in_features, layer.out_features, layer.weight.torch_dtype), tensors,
                  layer.prefix)  # fmt: skip
    return tensors, fq.float_bias(bias)


# --- fake quantization (training) --------------------------------------------------------------------------------
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_tokens(x: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token symmetric quantize-dequantize as ``quantize_per_token``: ``s = clip · amax / qmax``, [lo, hi]."""
    lo, hi = int_range(bits)
    scale = x.abs().amax(-1, keepdim=True) / hi
    if clip is not None:
        scale = scale * clip
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(_round_ste(x / scale), lo, hi) * scale


def fake_quant_rows(w: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Per-row weight quantize-dequantize after clipping to ``± clip · amax``: codes in [-qmax, qmax]."""
    hi = int_range(bits)[1]
    scale = w.abs().amax(1, keepdim=True) * clip[:, None] / hi
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(_round_ste(w / scale), -hi, hi) * scale


@torch.no_grad()
def mse_weight_clip(w: torch.Tensor, bits: int, lowest: float = 0.5, steps: int = 26) -> torch.Tensor:
    """Per row, the clip ratio in ``[lowest, 1]`` whose quantize-dequantize error of ``w`` is smallest."""
    best, best_err = torch.ones(w.shape[0]), torch.full((w.shape[0],), math.inf)
    for ratio in torch.linspace(1.0, lowest, steps):
        err = (fake_quant_rows(w, bits, torch.full((w.shape[0],), ratio.item())) - w).square().sum(1)
        better = err < best_err
        best, best_err = torch.where(better, ratio, best), torch.where(better, err, best_err)
    return best


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def hadamard(n: int) -> torch.Tensor | None:
    """An ``n × n`` Hadamard matrix (entries ±1, ``H Hᵀ = n I``) for ``n = 2^k · m``, ``m = 1`` or ``m = p + 1``
    with ``p`` prime and ``p ≡ 3 (mod 4)`` (Sylvester doubling of Paley's construction); None for other ``n``."""
    k = 0
    while n % 2**k == 0:
        m = n // 2**k
        p = m - 1
        if m == 1 or (p % 4 == 3 and all(p % d for d in range(2, math.isqrt(p) + 1))):
            h = torch.ones(1, 1) if m == 1 else _paley(p)
            for _ in range(k):
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
            return h
        k += 1
    return None


def _paley(p: int) -> torch.Tensor:
    """Paley I: ``[[1, 1ᵀ], [-1, Q + I]]``, ``Q[i, j]`` the quadratic character of ``j - i`` mod ``p``."""
    squares = torch.zeros(p, dtype=torch.bool)
    squares[torch.arange(1, p) ** 2 % p] = True
    diff = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    q = torch.where(diff == 0, 0.0, torch.where(squares[diff], 1.0, -1.0))
    h = torch.ones(p + 1, p + 1)
    h[1:, 0] = -1
    h[1:, 1:] = q + torch.eye(p)
    return h


def initial_rotation(n: int, generator: torch.Generator, kind: str) -> torch.Tensor:
    """An orthogonal ``n × n`` start: ``"hadamard"``, a Hadamard matrix with random row signs (random
    orthogonal where no Hadamard matrix of order ``n`` is known here), or ``"random"`` orthogonal."""
    h = hadamard(n) if kind == "hadamard" else None
    if h is None:
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return signs[:, None] * h / math.sqrt(n)


def kronecker_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] · (left ⊗ right)`` as ``leftᵀ · X · right`` (``kernels/flatquant.py``'s orientation)."""
    shape = x.shape
    xt = left.T @ x.reshape(-1, left.shape[0], shape[-1] // left.shape[0])
    if right is not None:
        xt = xt @ right
    return xt.reshape(shape)


class GroupTransform(nn.Module):
    """The transform of one group's input: ``c`` (optional), ``L``, ``R`` and the activation clip logit."""

    def __init__(self, k: int, a: int, act_bits: int, scale: torch.Tensor | None, generator: torch.Generator,
                 init: str = "hadamard") -> None:  # fmt: skip
        super().__init__()
        self.act_bits = act_bits
        self.left = nn.Parameter(initial_rotation(a, generator, init))
        self.right = nn.Parameter(initial_rotation(k // a, generator, init))
        self.log_scale = None if scale is None else nn.Parameter(scale.float().clamp_min(MIN_SCALE).log())
        self.act_clip = nn.Parameter(torch.tensor(CLIP_INIT)) if act_bits == 4 else None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def quantized_input(self, x: torch.Tensor, online_right: bool) -> torch.Tensor:
        """``x`` scaled, transformed and fake-quantized; computed once for the linears sharing the same ``x``."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        xt = self.transform(x, online_right)
        xt = fake_quant_tokens(xt, self.act_bits, None if self.act_clip is None else torch.sigmoid(self.act_clip))
        self._cache = (x, xt)
        return xt

    def transform(self, x: torch.Tensor, online_right: bool) -> torch.Tensor:
        """``(x / c) · (L ⊗ R)`` (``R`` left out where v_proj already applied it)."""
        scale = self.positive_scale()
        return kronecker_apply(x if scale is None else x / scale, self.left, self.right if online_right else None)

    def positive_scale(self) -> torch.Tensor | None:
        return None if self.log_scale is None else self.log_scale.exp()

    def clip_ratio(self) -> float:
        return 1.0 if self.act_clip is None else torch.sigmoid(self.act_clip).item()


class FakeQuantLinear(nn.Module):
    """A linear computing what its FlatQuant checkpoint will compute, differentiable in the transform parameters."""

    def __init__(self, linear: nn.Linear, group: GroupTransform, weight_bits: int, *, online_right: bool = True,
                 out_group: GroupTransform | None = None) -> None:  # fmt: skip
        super().__init__()
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.group, self.out_group = group, out_group
        self.weight_bits, self.online_right = weight_bits, online_right
        self.weight_clip = nn.Parameter(torch.full((self.weight.shape[0],), CLIP_INIT))
        self.fixed_weight: torch.Tensor | None = None  # the quantized weight, once chosen (GPTQ)

    def effective_weight(self) -> torch.Tensor:
        w, g = self.weight, self.group
        scale = g.positive_scale()
        if scale is not None:
            w = w * scale
        if self.out_group is not None:
            r = self.out_group.right
            w = (r.T @ w.reshape(-1, r.shape[0], w.shape[1])).reshape(w.shape)
        n, k = w.shape
        a = g.left.shape[0]
        w = torch.linalg.inv(g.left) @ w.reshape(n, a, k // a) @ torch.linalg.inv(g.right).T
        return w.reshape(n, k)

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.out_group is None:
            return self.bias
        r = self.out_group.right
        return (self.bias.reshape(-1, r.shape[0]) @ r).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group.quantized_input(x, self.online_right)
        w = self.fixed_weight
        if w is None:
            w = fake_quant_rows(self.effective_weight(), self.weight_bits, torch.sigmoid(self.weight_clip))
        return nn.functional.linear(x, w, self.effective_bias())


# --- the layer-by-layer pipeline ---------------------------------------------------------------------------------
@dataclass
class _Group:
    name: str
    norm: str | None  # module prefix whose weight takes 1 / c
    linears: list[LinearLayer]
    left_dim: int
    write_right: bool = True
    fold_into_v: bool = False  # o_proj: R lives in v_proj's output
    scale: bool = False


def _layer_groups(plan: QuantPlan, source: SourceCheckpoint, prefix: str, model_config) -> list[_Group]:
    groups = []
    scalable = model_config.model_type in SMOOTHABLE_MODEL_TYPES
    for name, (norm, projs) in LAYOUT.items():
        layers = [plan.linears.get(f"{prefix}.{p}") for p in projs]
        if any(layer is None or layer.quant_type not in FLATQUANT_SCHEMES for layer in layers):
            continue
        k = layers[0].in_features
        group = _Group(name, f"{prefix}.{norm}" if norm else None, layers, get_decompose_dim(k)[0])
        group.scale = scalable and (norm is None or f"{prefix}.{norm}.weight" in source.tensors)
        groups.append(group)
    by_name = {g.name: g for g in groups}
    if "down" in by_name:
        by_name["down"].scale = by_name["down"].scale and "gate_up" in by_name  # c folds into up_proj's rows
    if "o" in by_name:
        o = by_name["o"]
        heads = model_config.num_attention_heads
        head_dim = o.linears[0].in_features // heads
        v = plan.linears.get(f"{prefix}.self_attn.v_proj")
        o.scale = False
        if (scheme_class(o.linears[0].quant_type, "linear").right_trans_optional and "qkv" in by_name
                and heads * head_dim == o.linears[0].in_features and v.out_features % head_dim == 0):  # fmt: skip
            o.left_dim, o.write_right, o.fold_into_v = heads, False, True
    return groups


def _decoder_layers(plan: QuantPlan) -> tuple[str, list[str]]:
    """The decoder-layer container (``model.layers``) and the FlatQuant layers' decoder-layer prefixes."""
    prefixes = []
    for layer in plan.quantized:
        if layer.quant_type not in FLATQUANT_SCHEMES:
            continue
        parent = next((layer.prefix[: -len(p) - 1] for _, ps in LAYOUT.values() for p in ps
                       if layer.prefix.endswith(f".{p}")), None)  # fmt: skip
        if parent is None or not parent.rpartition(".")[2].isdigit():
            raise QuantCoreError(
                f"{layer.prefix} is {layer.quant_type}: FlatQuant calibration knows the Llama-family decoder layout "
                "(<layers>.<i>.self_attn.{q,k,v,o}_proj, <layers>.<i>.mlp.{gate,up,down}_proj). Give this layer "
                f"another scheme, e.g. --layer-scheme '{layer.prefix}=W8A8_DYNAMIC'."
            )
        prefixes.append(parent)
    return decoder_stack(prefixes)


def calibrate_flatquant(
    session: FloatModel,
    source: SourceCheckpoint,
    plan: QuantPlan,
    config: FlatQuantConfig,
    *,
    progress: bool = True,
) -> FlatQuantResult:
    """Fit every FlatQuant layer's transforms on the calibration text (see the module docstring)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    container, layer_prefixes = _decoder_layers(plan)
    layers = session.module(container)
    model_config = session.model.config
    ids = calibration_windows(session, session.config.samples, session.config.seq_len)
    batch = max(1, config.batch_tokens // ids.shape[1])
    session.model.requires_grad_(False)
    inputs, kwargs = capture_inputs(session.model, layers[0], ids)
    q_inputs = inputs  # what the layer receives from the layers quantized before it
    result = FlatQuantResult(windows=tuple(ids.shape))
    generator = torch.Generator().manual_seed(SEED)
    last = int(layer_prefixes[-1].rpartition(".")[2])
    wanted = set(layer_prefixes)
    bar = tqdm(total=len(layer_prefixes), desc="FlatQuant", unit="layer", disable=None if progress else True)
    threads = torch.get_num_threads()
    try:
        for i in range(last + 1):
            torch.set_num_threads(fastest_threads(threads))
            prefix = f"{container}.{i}"
            layer = layers[i]
            groups = _layer_groups(plan, source, prefix, model_config) if prefix in wanted else []
            watch = {g.name: session.module(g.linears[0].prefix) for g in groups if g.scale}
            targets, absmax = layer_outputs(layer, inputs, kwargs, batch, watch)
            if groups:
                fit = _Fit(session, source, layer, groups, generator)
                losses = fit.train(absmax, q_inputs, targets, kwargs, batch, config)
                fit.record(result)
                if config.gptq:
                    fit.gptq(plan, result, q_inputs, kwargs, batch)
                result.losses.append(losses)
                bar.set_postfix_str(f"{prefix} mse {losses[1]:.3g}", refresh=False)
                bar.update()
                q_outputs = targets
                out = fit.run(q_inputs, kwargs, batch)
                result.final.append(nn.functional.mse_loss(out.float(), targets).item())
                q_outputs = out if config.quantized_inputs else targets
            else:
                q_outputs = targets if q_inputs is inputs else layer_outputs(layer, q_inputs, kwargs, batch, {})[0]
            inputs, q_inputs = targets, q_outputs
    finally:
        torch.set_num_threads(threads)
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def token_weights(inputs: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``[n, T]`` loss weights: 1, except tokens whose layer output change ``|Δ_t|²`` exceeds ``cap ×`` the median,
    weighted ``cap · median / |Δ_t|²``, so that no token counts more than at ``cap ×`` the median change."""
    delta = (targets - inputs).square().sum(-1)
    if cap is None:
        return torch.ones_like(delta)
    return (cap * delta.median() / delta.clamp_min(1e-30)).clamp(max=1.0)


def fastest_threads(available: int) -> int:
    """``available`` or 1 torch threads, whichever runs a training-sized probe faster right now.

    When other processes keep the cores busy, OpenMP threads wait for each other at every op, and the many small
    ops of a fake-quantized training step (and of GPTQ's column loop) ran 10-100x slower with 2 threads than with
    1 on the shared 2-core development machine; on idle cores 2 threads win. Measured before each decoder layer.
    """
    if available <= 1:
        return 1
    x, w = torch.randn(256, 576), torch.randn(1536, 576)
    times = {}
    for n in (available, 1):
        torch.set_num_threads(n)
        begin = time.perf_counter()
        for _ in range(3):
            fake_quant_tokens(fake_quant_tokens(x, 4) @ w.T, 8)
        times[n] = time.perf_counter() - begin
    return min(times, key=times.get)


class _Fit:
    """One decoder layer's groups: their parameters, the fake-quantized linears swapped in while training, and
    the :class:`LinearTransform` s they yield."""

    def __init__(self, session: FloatModel, source: SourceCheckpoint, layer: nn.Module, groups: list[_Group],
                 generator: torch.Generator) -> None:  # fmt: skip
        self.session, self.source, self.layer, self.groups, self.generator = session, source, layer, groups, generator
        self.transforms: dict[str, GroupTransform] = {}
        self.fakes: dict[str, tuple[nn.Module, str, nn.Module, FakeQuantLinear]] = {}

    def build(self, absmax: dict[str, torch.Tensor], config: FlatQuantConfig) -> None:
        module = self.session.module
        for g in self.groups:
            scale = None
            if g.scale:
                w_absmax = torch.stack([module(lin.prefix).weight.abs().amax(0) for lin in g.linears]).amax(0)
                scale = smoothing_factors(absmax[g.name], w_absmax, SCALE_ALPHA)
            act_bits = FLATQUANT_BITS[g.linears[0].quant_type][0]
            self.transforms[g.name] = GroupTransform(g.linears[0].in_features, g.left_dim, act_bits, scale,
                                                     self.generator, config.init)  # fmt: skip
        o = next((g for g in self.groups if g.name == "o" and g.fold_into_v), None)
        for g in self.groups:
            for lin in g.linears:
                out_group = self.transforms["o"] if o is not None and lin.prefix.endswith(".v_proj") else None
                original = module(lin.prefix)
                fake = FakeQuantLinear(original, self.transforms[g.name], FLATQUANT_BITS[lin.quant_type][1],
                                       online_right=not g.fold_into_v, out_group=out_group)  # fmt: skip
                parent, _, attr = lin.prefix.rpartition(".")
                self.fakes[lin.prefix] = (module(parent), attr, original, fake)
                if config.clip_search:
                    with torch.no_grad():
                        ratio = mse_weight_clip(fake.effective_weight(), fake.weight_bits).clamp(max=0.99)
                        fake.weight_clip.copy_(torch.logit(ratio))

    def train(self, absmax, inputs, targets, kwargs, batch: int, config: FlatQuantConfig) -> tuple[float, float]:
        """Build the parameters and fit them; returns the first and last epoch's mean loss (NaN without epochs)."""
        self.build(absmax, config)
        transforms = self.transforms.values()
        params = [p for t in transforms for p in (t.left, t.right, t.log_scale) if p is not None]
        clips = [t.act_clip for t in transforms if t.act_clip is not None]
        clips += [fake.weight_clip for *_, fake in self.fakes.values()]
        n = len(inputs)
        steps = config.epochs * math.ceil(n / batch)
        optimizer = torch.optim.AdamW([{"params": params, "lr": config.lr}, {"params": clips, "lr": config.clip_lr}],
                                      weight_decay=0.0)  # fmt: skip
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps), eta_min=config.lr * 1e-2)
        losses = []
        weights = token_weights(inputs, targets, config.token_cap)
        for parent, attr, _, fake in self.fakes.values():
            setattr(parent, attr, fake)
        try:
            for _ in range(config.epochs):
                total = 0.0
                for index in torch.randperm(n, generator=self.generator).split(batch):
                    out = run_layer(self.layer, inputs[index], batch_kwargs(kwargs, index, n))
                    loss = ((out.float() - targets[index]).square() * weights[index, :, None]).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    for t in transforms:
                        t._cache = None
                    total += loss.item() * len(index)
                losses.append(total / n)
        finally:
            for parent, attr, original, _ in self.fakes.values():
                setattr(parent, attr, original)
        return (losses[0], losses[-1]) if losses else (math.nan, math.nan)

    @torch.no_grad()
    def record(self, result: FlatQuantResult) -> None:
        for g in self.groups:
            t = self.transforms[g.name]
            scale = t.positive_scale()
            column_scale = None if scale is None else scale.detach().clone()
            if scale is not None and g.norm is not None:
                norm = self.session.module(g.norm).weight.detach().float()
                new = (norm / scale).to(self.source.tensors[f"{g.norm}.weight"].torch_dtype)
                # the norm is stored rounded: scale the weights by what the rounded norm actually divides by
                column_scale = torch.where(new.float() != 0, norm / new.float(), torch.ones_like(norm))
                result.norms[f"{g.norm}.weight"] = new
            for lin in g.linears:
                fake = self.fakes[lin.prefix][3]
                result.linears[lin.prefix] = LinearTransform(
                    quant_type=lin.quant_type,
                    left=t.left.detach().clone(),
                    right=t.right.detach().clone(),
                    write_right=g.write_right,
                    clip_ratio=t.clip_ratio(),
                    weight_clip=torch.sigmoid(fake.weight_clip.detach()),
                    column_scale=column_scale,
                    out_right=None if fake.out_group is None else fake.out_group.right.detach().clone(),
                )
            if g.name == "down" and g.scale:
                up = g.linears[0].prefix.rpartition(".")[0] + ".up_proj"
                result.linears[up].row_scale = 1 / column_scale

    @torch.no_grad()
    def gptq(self, plan: QuantPlan, result: FlatQuantResult, inputs, kwargs, batch: int) -> None:
        """GPTQ on each linear's folded weight, with the Hessian of its group's transformed input as it arrives in
        the fake-quantized layer; stores the inner tensors in ``result`` and the weights in the fakes."""
        accs = {g.name: HessianAccumulator() for g in self.groups}
        handles = []
        for g in self.groups:
            t, acc, online = self.transforms[g.name], accs[g.name], not g.fold_into_v
            hook = lambda _m, args, t=t, acc=acc, online=online: acc.update(t.transform(args[0], online))  # noqa: E731
            handles.append(self.fakes[g.linears[0].prefix][3].register_forward_pre_hook(hook))
        try:
            self.run(inputs, kwargs, batch)
        finally:
            for h in handles:
                h.remove()
        for g in self.groups:
            if accs[g.name].tokens < GPTQ_MIN_TOKENS_PER_INPUT * g.linears[0].in_features:
                result.rtn.append(g.linears[0].prefix)
                continue
            hessian = accs[g.name].hessian()
            for lin in g.linears:
                fq = result.linears[lin.prefix]
                weight = self.fakes[lin.prefix][2].weight
                w = fq.clipped_weight(weight)  # on the learned clip: lower layer MSE than GPTQ's own amax / qmax
                bits = FLATQUANT_BITS[lin.quant_type][1]
                found = gptq_quantize(w, hessian, Grid(bits, w.shape[1], True), layer=lin.prefix)
                row_parallel = getattr(plan.scheme_for(lin), "row_parallel", False)
                fq.inner = checkpoint_tensors(GPTQ_GRID[lin.quant_type], found, row_parallel=row_parallel)
                deq = found.dequantized  # the fake quantizes down_proj's c at its input, not in up_proj's rows
                self.fakes[lin.prefix][3].fixed_weight = deq if fq.row_scale is None else deq / fq.row_scale[:, None]

    @torch.no_grad()
    def run(self, inputs, kwargs, batch: int) -> torch.Tensor:
        """The fake-quantized layer's outputs."""
        outs = []
        for parent, attr, _, fake in self.fakes.values():
            setattr(parent, attr, fake)
        try:
            for index in torch.arange(len(inputs)).split(batch):
                outs.append(run_layer(self.layer, inputs[index], batch_kwargs(kwargs, index, len(inputs))))
                for t in self.transforms.values():
                    t._cache = None
        finally:
            for parent, attr, original, _ in self.fakes.values():
                setattr(parent, attr, original)
        return torch.cat(outs)
