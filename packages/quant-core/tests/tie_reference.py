"""float64 per-token fake quantization that also reports rounding ties, for the W4A4 / FlatQuant tests.

A backend computing ``x / s`` (or the FlatQuant transform) in float32 can round an element that sits within ~1e-6
of a ``.5`` boundary the other way than float64 does. With int4 activations one such flip moves a token's output by
``s · |w|`` (≈ 1/√K of it), more than any tight tolerance, so the references below report, per output element, the
most those near-tie elements can move it (``slack``), and :func:`excess_err` measures only the error beyond that.
Written from the spec, independently of quant-core's code.
"""

import torch

TIE_WINDOW = 1e-3  # in units of the quantization step; float32 vs float64 differences are ≈ 1e-5 of a step


def fake_quant_with_ties(x: torch.Tensor, qmax: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s · clamp(round(x / s), -qmax-1, qmax), s · [x / s is within TIE_WINDOW of a tie])`` per row, with
    ``s = clip · amax|x| / qmax``."""
    x = x.double()
    s = clip * x.abs().amax(dim=-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    v = x / s
    near_tie = ((v - v.floor() - 0.5).abs() < TIE_WINDOW) & (v > -qmax - 1) & (v < qmax)
    return torch.clamp(torch.round(v), -qmax - 1, qmax) * s, near_tie * s


def linear_with_slack(
    xq: torch.Tensor, tie_s: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``xq @ wᵀ (+ bias)`` and the bound on what one-step flips at the near-tie elements can change."""
    y = xq @ w.double().T
    return (y if bias is None else y + bias.double()), tie_s @ w.double().abs().T


def excess_err(y: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor) -> float:
    """Relative Frobenius error of ``y`` beyond ``slack`` (elementwise)."""
    excess = ((y.double() - ref).abs() - slack).clamp(min=0)
    return (excess.norm() / ref.norm().clamp_min(1e-30)).item()


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """ModelSlim int8 ``[N/2, K]`` -> int64 ``[N, K]``: row 2j from the low nibble, 2j+1 from the high one, signed."""
    u = packed.to(torch.int64) & 0xFF
    low, high = u & 0xF, u >> 4
    rows = torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows)
