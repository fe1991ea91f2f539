"""Shared data for the linear-scheme tests: shapes, inputs, float64 references and error measures.

The references here are written from the format spec in float64, independently of quant-core's code.
"""

import torch

# (K, N): K = 576 is SmolLM2-135M's hidden size (not a multiple of 128); 96 x 33 has an odd N.
SHAPES = [(64, 48), (576, 96), (96, 33), (256, 128)]
EVEN_N_SHAPES = [(k, n) for k, n in SHAPES if n % 2 == 0]
# Leading dims of x: 1-D, 2-D and 3-D inputs.
BATCH_SHAPES = [(), (1,), (7,), (2, 5)]
ACT_DTYPES = [torch.float32, torch.bfloat16]


def make_input(batch: tuple[int, ...], k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, k, generator=g).to(dtype)


def make_weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k**0.5


def fake_quant_per_token(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """float64 symmetric per-row fake quantization: round(x / s) * s with s = amax / qmax."""
    x = x.double()
    s = x.abs().amax(dim=-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``y`` against ``ref``."""
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def output_tolerance(dtype: torch.dtype, exact: float) -> float:
    """``exact`` for float32 outputs; bf16 outputs add their rounding (2^-8 relative, taken with margin)."""
    return exact if dtype == torch.float32 else max(exact, 1e-2)
