"""GPTQ (Frantar et al., 2022) for the weight-only and int4 schemes, on the schemes' own RTN grids.

Per linear, with ``X`` its calibration inputs (``n`` tokens), ``H = 2 XᵀX / n``; dead inputs (``H_jj = 0``) get
``H_jj = 1`` and a zero weight column; ``H += 1 % · mean(diag H) · I``; ``U`` = upper Cholesky factor of ``H⁻¹``.
Columns are quantized left to right in blocks of 128; each column's rounding error, divided by ``U_jj``, is spread
over the not-yet-quantized columns through row j of ``U`` (lazy batch updates across blocks).

The grid is the scheme's RTN grid, so the checkpoint has the scheme's usual tensors:

=================  =============================================================================================
W8A16              int8 symmetric per row: ``s = amax / 127`` of the row
W4A4_DYNAMIC       int4 symmetric per row, ``s = amax / 7``
W4A8_DYNAMIC g=0   int4 symmetric per row, ``s = amax / 7``
W4A8_DYNAMIC g>0   two-step: row scale ``s1 = amax / 127``; per group ``s2 = max(1, ceil(amax(|w / s1|) / 7.5))``
                   (integer), int4 step ``s1 · s2``
W4A16              int4 asymmetric per group (or row): ``s = (max - min) / 15``, integer offset
=================  =============================================================================================

Row scales come from the original weights (as GPTQ does without groups); group parameters from the running,
error-updated weights when the group's first column is reached (as GPTQ does with groups). The integer codes are
then assembled into the scheme's tensors directly (RTN on the dequantized result would not always round-trip: a
row whose largest code is below ``qmax`` would get a smaller scale). ``W4A8_DYNAMIC``'s ``scale_bias`` is
``8 · Σ`` of the dequantized weight per row (per 16 K-chunks for row-parallel layers), modelslim-tool.md §4.8.

Options (``quantize_model(gptq_clip=..., gptq_act_order=...)``): ``clip`` searches, per row and group, the range
shrink ratio ``r`` in ``[clip, 1]`` (``CLIP_STEPS`` candidates) minimising ``Σ |Q(w) - w|^2.4`` of the group's
weights (the ``mse`` option of the GPTQ reference code; AWQ / OmniQuant learn the same clipping), so a single large
weight no longer sets the step of its whole group. ``act_order`` quantizes columns by decreasing ``H_jj`` (the
inputs with the most energy first, while the most columns are left to absorb their error); groups then use
*static* parameters computed from the original weights before the loop (each group's columns are no longer
contiguous in processing order), so the checkpoint layout is unchanged.

Hessians come from the quantized model, layer by layer (:mod:`~quant_core.quantize.gptq_sequential`): each
decoder layer's linears see the activations of the layers before them with their GPTQ weights already in place
(and, within a layer, of the earlier stages: q/k/v, then o_proj, gate/up, down_proj), routed MoE experts the
tokens the router sends them. Only one decoder layer's Hessians are held at a time (K² float32 per distinct input;
a 7B-class layer: about 0.7 GB).
"""

from dataclasses import dataclass

import torch

from quant_core.errors import QuantCoreError
from quant_core.primitives import int_range, pack_int4_rows

GPTQ_SCHEMES = ("W8A16", "W4A16", "W4A8_DYNAMIC", "W4A4_DYNAMIC")
BLOCK_SIZE = 128
DAMPING = 0.01
CLIP_STEPS = 20  # candidate shrink ratios from 1 down to Grid.clip
CLIP_NORM = 2.4  # the GPTQ reference code's error norm for its range search
ROW_PARALLEL_CHUNKS = 16


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # columns per group; == K for per-row parameters
    symmetric: bool
    two_step: bool = False  # W4A8_DYNAMIC per group: int8 row scale × integer group scale
    clip: float = 1.0  # smallest range shrink ratio searched (1: no search, plain min/max)


def grid_for(quant_type: str, scheme, in_features: int, out_features: int) -> Grid:
    if quant_type == "W8A16":
        return Grid(8, in_features, True)
    if quant_type == "W4A4_DYNAMIC":
        return Grid(4, in_features, True)
    if quant_type == "W4A8_DYNAMIC":
        g = scheme.group_size
        return Grid(4, g, True, two_step=True) if g else Grid(4, in_features, True)
    if quant_type == "W4A16":
        return Grid(4, scheme.check_layout(in_features, out_features), False)
    raise QuantCoreError(f"GPTQ supports {', '.join(GPTQ_SCHEMES)}, not {quant_type}.")


class HessianAccumulator:
    """``Σ xᵀx`` and the token count of one linear's inputs."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1])
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None or not self.tokens:
            raise QuantCoreError("GPTQ: a layer received no calibration input; add calibration samples.")
        return 2 * self.sum / self.tokens


class GroupParams:
    """Scale / offset of the current group (all rows at once), and the quantizer on that grid."""

    def __init__(self, grid: Grid, row_scale: torch.Tensor | None) -> None:
        self.grid = grid
        self.lo, self.hi = int_range(grid.bits)
        self.row_scale = row_scale  # two-step only: [N]
        self.scale = self.offset = self.second = None

    def find(self, w: torch.Tensor) -> None:
        """Parameters for the group whose (running) weights are ``w [N, g]``: the RTN schemes' formulas on the
        range shrunk by ``r`` (``r = 1`` without clip search; else per row the ``r`` of least ``CLIP_NORM`` error)."""
        self._set(w, 1.0)
        if self.grid.clip >= 1:
            return
        best = self._error(w)
        chosen = (self.scale.clone(), self.offset.clone(), None if self.second is None else self.second.clone())
        for r in torch.linspace(1, self.grid.clip, CLIP_STEPS)[1:].tolist():
            self._set(w, r)
            err = self._error(w)
            better = err < best
            best = torch.where(better, err, best)
            chosen = tuple(None if c is None else torch.where(better, new, c)
                           for c, new in zip(chosen, (self.scale, self.offset, self.second), strict=True))  # fmt: skip
        self.scale, self.offset, self.second = chosen

    def _error(self, w: torch.Tensor) -> torch.Tensor:
        deq = self.dequantize(self.quantize(w.T)).T
        return (deq - w).abs().pow(CLIP_NORM).sum(1)

    def _set(self, w: torch.Tensor, r: float) -> None:
        tiny = torch.finfo(torch.float32).tiny
        if self.grid.two_step:
            w8 = torch.round(w / self.row_scale[:, None])
            self.second = (w8.abs().amax(1) * r / 7.5).ceil().clamp_min(1)
            self.scale, self.offset = self.row_scale * self.second, torch.zeros_like(self.second)
        elif self.grid.symmetric:
            scale = w.abs().amax(1) * r / self.hi
            self.scale, self.offset = torch.where(scale > 0, scale, tiny), torch.zeros_like(scale)
        else:
            wmin, wmax = w.amin(1).clamp(max=0) * r, w.amax(1).clamp(min=0) * r
            scale = (wmax - wmin) / (self.hi - self.lo)
            self.offset = torch.round(self.lo - wmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
            self.scale = torch.where(scale > 0, scale, tiny)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes of column ``w [N]`` (or columns ``[..., N]``)."""
        return torch.clamp(torch.round(w / self.scale + self.offset), self.lo, self.hi)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.offset) * self.scale


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [N, K] integers (float)
    scale: torch.Tensor  # [N, G] per-group step (two-step: s1 · s2)
    offset: torch.Tensor  # [N, G]
    second: torch.Tensor | None  # two-step: [N, G] integer group scales
    row_scale: torch.Tensor | None  # two-step: [N] int8 row scales
    dequantized: torch.Tensor  # [N, K] float32


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, layer: str = "", act_order: bool = False
) -> GPTQResult:
    """Quantize ``weight [N, K]`` with GPTQ given ``hessian [K, K]``; returns the codes and grid parameters (in the
    original column order, also with ``act_order``)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    g = grid.group_size
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    static = act_order and g != k  # group parameters fixed up front from the original weights
    w, h = w[:, perm], h[perm][:, perm]
    h_inv_upper = _inverse_cholesky(h, layer)

    row_scale = None
    if grid.two_step:
        row_scale = w.abs().amax(1) / 127
        row_scale = torch.where(row_scale > 0, row_scale, torch.finfo(torch.float32).tiny)
    params = GroupParams(grid, row_scale)
    if g == k:
        params.find(w)
    groups = k // g
    codes = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    scales, offsets, seconds = torch.zeros(n, groups), torch.zeros(n, groups), torch.zeros(n, groups)
    if static:
        original = torch.empty_like(w)
        original[:, perm] = w
        for j in range(groups):
            params.find(original[:, j * g : (j + 1) * g])
            scales[:, j], offsets[:, j] = params.scale, params.offset
            if grid.two_step:
                seconds[:, j] = params.second

    for i1 in range(0, k, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, k)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv_upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i  # position in processing order; perm[col] is the original column
            if static:
                group = perm[col].item() // g
                params.scale, params.offset = scales[:, group], offsets[:, group]
            elif col % g == 0:
                if g != k:  # group parameters from the running weights (this block's updated columns, then later)
                    params.find(torch.cat([block[:, i:], w[:, i2:]], dim=1)[:, :g])
                scales[:, col // g], offsets[:, col // g] = params.scale, params.offset
                if grid.two_step:
                    seconds[:, col // g] = params.second
            column = block[:, i]
            q = params.quantize(column)
            codes[:, col] = q
            deq[:, col] = params.dequantize(q)
            err = (column - deq[:, col]) / h_block[i, i]
            block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ h_inv_upper[i1:i2, i2:]
    inverse = torch.argsort(perm)
    codes, deq = codes[:, inverse], deq[:, inverse]
    return GPTQResult(codes, scales, offsets, seconds if grid.two_step else None, row_scale, deq)


def _inverse_cholesky(h: torch.Tensor, layer: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, λ = 1 % of the mean diagonal (×10 on failure, at most 4 times)."""
    damp = DAMPING * torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0])
    for _ in range(4):
        lower, info = torch.linalg.cholesky_ex(h.double() + damp * eye.double())
        if not info:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                return upper.float()
        damp *= 10
    raise QuantCoreError(
        f"GPTQ: the Hessian of {layer or 'a layer'} is not positive definite even with damping; its calibration "
        "inputs are degenerate. Add calibration samples or quantize it without --gptq (e.g. --skip it)."
    )


def checkpoint_tensors(quant_type: str, result: GPTQResult, *, row_parallel: bool) -> dict[str, torch.Tensor]:
    """The scheme's checkpoint tensors for GPTQ codes (same names, dtypes and shapes as its ``quantize_weights``)."""
    q = result.codes.to(torch.int8)
    n, k = q.shape
    zeros = torch.zeros(n, 1)
    if quant_type in ("W8A16", "W4A4_DYNAMIC"):
        return {"weight": q, "weight_scale": result.scale, "weight_offset": zeros}
    if quant_type == "W4A16":
        return {"weight": pack_int4_rows(q), "weight_scale": result.scale, "weight_offset": result.offset}
    if quant_type == "W4A8_DYNAMIC":
        chunks = ROW_PARALLEL_CHUNKS if row_parallel else 1
        scale_bias = 8 * result.dequantized.view(n, chunks, k // chunks).sum(-1)
        two_step = result.second is not None
        tensors = {"weight": pack_int4_rows(q), "weight_scale": result.row_scale[:, None] if two_step else result.scale,
                   "weight_offset": zeros, "scale_bias": scale_bias}  # fmt: skip
        if two_step:
            tensors["weight_scale_second"] = result.second
            tensors["weight_offset_second"] = torch.zeros(n, result.second.shape[1], dtype=torch.int64)
        return tensors
    raise QuantCoreError(f"GPTQ supports {', '.join(GPTQ_SCHEMES)}, not {quant_type}.")
