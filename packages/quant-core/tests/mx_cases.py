"""float64 references and checkpoints for the MX tests (test_mxfp8.py, test_mxfp4.py), written from the format spec
(modelslim-format.md §6.3, the OCP MX rules) independently of quant-core's code.

* E8M0 code ``c`` -> ``2^(c - 127)``; FP4 E2M1 codes 0..7 = {0, 0.5, 1, 1.5, 2, 3, 4, 6}, 8..15 negative; two codes
  per byte along K, element 2j in the low nibble.
* Activations per 32-block of K: ``e = floor(log2 amax) - emax`` (emax 8 for E4M3, 2 for E2M1; -127 for an all-zero
  block), elements rounded to the nearest representable value, ties to the even code, saturating.
"""

import torch
from linear_cases import SHAPES

FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
EMAX = {"fp8": 8, "fp4": 2}
# K = 80 is not a multiple of 32: its last block holds 16 elements (msModelSlim zero-pads it).
MX_SHAPES = [*SHAPES, (80, 24)]


def e8m0(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor([2.0 ** (int(c) - 127) for c in codes.flatten()], dtype=torch.float64).reshape(codes.shape)


def fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    mag = torch.tensor(FP4, dtype=torch.float64)[codes.long() & 7]
    return torch.where(codes.long() >= 8, -mag, mag)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` -> codes ``[N, K]``: byte j holds element 2j (low nibble) and 2j+1 (high nibble)."""
    out = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.int64)
    out[:, 0::2] = packed.long() & 0xF
    out[:, 1::2] = packed.long() >> 4
    return out


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def weight_values(ckpt: dict[str, torch.Tensor], element: str) -> torch.Tensor:
    """The float64 ``[N, K]`` weight a checkpoint encodes."""
    w = ckpt["weight"].double() if element == "fp8" else fp4_decode(fp4_unpack(ckpt["weight"]))
    scale = e8m0(ckpt["weight_scale"]).repeat_interleave(32, dim=1)[:, : w.shape[1]]
    return w * scale


def round_element(v: torch.Tensor, element: str) -> torch.Tensor:
    """Nearest representable element value (ties to even code), saturating; ``v`` float64."""
    if element == "fp8":  # v is a float32 value times a power of two here: one rounding, float32 -> E4M3
        return v.clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
    dists = (v.abs().clamp(max=6.0)[..., None] - torch.tensor(FP4, dtype=torch.float64)).abs()
    nearest = dists == dists.min(dim=-1, keepdim=True).values  # one code, or two on a tie
    even = torch.arange(8) % 2 == 0
    tie = nearest.sum(dim=-1) > 1
    code = torch.where(tie, (nearest & even).int().argmax(dim=-1), nearest.int().argmax(dim=-1))
    return torch.copysign(torch.tensor(FP4, dtype=torch.float64)[code], v)


def mx_fake_quant(x: torch.Tensor, element: str) -> torch.Tensor:
    """float64 per-row, per-32-block MX quantize -> dequantize of ``x [M, K]``."""
    x = x.double()
    out = torch.empty_like(x)
    for start in range(0, x.shape[1], 32):
        block = x[:, start : start + 32]
        amax = block.abs().amax(dim=1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        e = torch.where(amax > 0, torch.floor(torch.log2(safe)) - EMAX[element], torch.full_like(amax, -127.0))
        scale = 2.0 ** e.clamp(-127, 127)
        out[:, start : start + 32] = round_element(block / scale, element) * scale
    return out


def reference(ckpt, x: torch.Tensor, element: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_blocks (x_e · 2^{e_x}) · (w_e · 2^{e_w}) + bias`` in float64, for ``x [..., K]``."""
    k = x.shape[-1]
    y = mx_fake_quant(x.reshape(-1, k), element) @ weight_values(ckpt, element).T
    y = y if bias is None else y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


def checkpoint(k: int, n: int, element: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A checkpoint in msModelSlim's layout: E4M3 ``[N, K]`` (values across many binades, some saturated) or packed
    E2M1 ``uint8 [N, K/2]`` (every code), E8M0 ``weight_scale uint8 [N, ceil(K/32)]`` (2^-15 .. 2^-3)."""
    g = torch.Generator().manual_seed(seed)
    if element == "fp8":
        weight = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        weight = fp4_pack(torch.randint(0, 16, (n, k), generator=g))
    scale = torch.randint(112, 125, (n, -(-k // 32)), generator=g).to(torch.uint8)
    return {"weight": weight, "weight_scale": scale}
