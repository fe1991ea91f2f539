"""Emulated torch_npu ops and dtypes for the FP8 and MX (A5) schemes, from ``npu-ops.md``, written independently of
quant-core's code (float64 arithmetic, its own FP4 and E8M0 codecs).

Installed on top of ``npu_emulator`` by the ``npu`` fixture (conftest.py): ``npu_dynamic_mx_quant`` is new;
``npu_dynamic_quant`` and ``npu_quant_matmul`` gain their FP8 / MX modes and hand every other call to
``npu_emulator``'s versions. Conventions where the documentation is silent (inferred, like the kernels that call
these ops):

* ``npu_dynamic_mx_quant(x, dst_type)``: OCP "direct" shared exponent ``floor(log2 amax) - emax`` per 32-block of the
  last dim (emax 8 for E4M3, 2 for E2M1; an all-zero block gets -127), elements rounded to nearest even and
  saturated; FP4 returned packed two per byte (low nibble = even element) as uint8 ``[M, K/2]``; exponents as uint8
  ``e + 127`` laid out ``[M, K/64, 2]``.
* ``npu_quant_matmul`` in MX mode (``group_sizes`` given): ``x2`` is ``[K, N]`` (FP8) or, for FP4, ``[K/2, N]``,
  the transposed view of a ``[N, K/2]`` tensor packed along K; ``scale`` is ``[K/64, N, 2]``.
* FP8 per-token ``npu_dynamic_quant``: ``s = amax / 448``, ``q = fp8(x / s)``.
"""

import npu_emulator
import torch

float8_e8m0fnu = torch.float8_e8m0fnu
float4_e2m1fn_x2 = torch.float4_e2m1fn_x2
_base_dynamic_quant = npu_emulator.npu_dynamic_quant
_base_quant_matmul = npu_emulator.npu_quant_matmul
_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_EMAX = {torch.float8_e4m3fn: 8, float4_e2m1fn_x2: 2}


def _fp4_encode(v: torch.Tensor) -> torch.Tensor:
    """float64 values -> E2M1 codes: the nearest grid point, ties to the even code, saturating at 6."""
    even_first = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # argmin takes the first of equal distances
    grid = torch.tensor(_FP4, dtype=torch.float64)[even_first]
    nearest = (v.abs().clamp(max=6.0)[..., None] - grid).abs().argmin(dim=-1)
    return even_first[nearest] + 8 * (v < 0).to(torch.int64)


def _fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    mag = torch.tensor(_FP4, dtype=torch.float64)[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, K/2]`` -> codes ``[R, K]`` (low nibble first)."""
    p = packed.to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def npu_dynamic_mx_quant(x: torch.Tensor, dst_type=torch.float8_e4m3fn, round_mode="rint", scale_alg=0, **kwargs):
    npu_emulator._record("npu_dynamic_mx_quant")
    rows = x.reshape(-1, x.shape[-1]).double()
    m, k = rows.shape
    assert k % 64 == 0, f"npu_dynamic_mx_quant emulator: K={k} must be a multiple of 64"
    blocks = rows.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(dim=-1)
    emax = _EMAX[dst_type]
    exp = torch.where(amax > 0, torch.floor(torch.log2(torch.where(amax > 0, amax, 1.0))) - emax, -127.0)
    exp = exp.clamp(-127, 127)
    v = (blocks / 2.0 ** exp[..., None]).reshape(m, k)
    if dst_type == float4_e2m1fn_x2:
        codes = _fp4_encode(v)
        q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    else:
        q = v.clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, (exp + 127).to(torch.uint8).reshape(m, k // 64, 2)


def npu_dynamic_quant(x: torch.Tensor, dst_type: torch.dtype = torch.int8, **kwargs):
    if dst_type != torch.float8_e4m3fn:
        return _base_dynamic_quant(x, dst_type=dst_type, **kwargs)
    npu_emulator._record("npu_dynamic_quant")
    rows = x.reshape(-1, x.shape[-1]).double()
    scale = rows.abs().amax(dim=-1) / 448
    q = (rows / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.float()


def _mx_operand(t: torch.Tensor, fp4: bool, transposed: bool) -> torch.Tensor:
    if not fp4:
        return t.double()
    return _fp4_decode(_unpack_fp4(t.T)).T if transposed else _fp4_decode(_unpack_fp4(t))


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16, **kw):
    fp8 = x1.dtype == torch.float8_e4m3fn
    if kw.get("group_sizes") is None and not fp8:
        return _base_quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                                  output_dtype=output_dtype, **kw)  # fmt: skip
    npu_emulator._record("npu_quant_matmul")
    if kw.get("group_sizes") is None:  # FP8 per-token x per-channel: float32 scales
        y = (x1.double() @ x2.double()) * scale.double() * pertoken_scale.double().reshape(-1, 1)
    else:
        assert kw["scale_dtype"] == kw["pertoken_scale_dtype"] == float8_e8m0fnu, "MX mode takes E8M0 scales"
        block = kw["group_sizes"][-1]
        a = _mx_operand(x1, kw.get("x1_dtype") == float4_e2m1fn_x2, transposed=False)  # [M, K]
        b = _mx_operand(x2, kw.get("x2_dtype") == float4_e2m1fn_x2, transposed=True)  # [K, N]
        k = a.shape[1]
        assert b.shape[0] == k and k % block == 0, (
            f"npu_quant_matmul MX: K mismatch {tuple(a.shape)} @ {tuple(b.shape)}"
        )
        sa = 2.0 ** (pertoken_scale.reshape(a.shape[0], -1).double() - 127)  # [M, K/32]
        sb = 2.0 ** (scale.permute(1, 0, 2).reshape(b.shape[1], -1).double() - 127)  # [N, K/32]
        y = (a * sa.repeat_interleave(block, dim=1)) @ (b * sb.repeat_interleave(block, dim=1).T)
    if bias is not None:
        y = y + bias.double()
    return y.to(output_dtype)


OPS = {
    "npu_dynamic_mx_quant": npu_dynamic_mx_quant,
    "npu_dynamic_quant": npu_dynamic_quant,
    "npu_quant_matmul": npu_quant_matmul,
    "float8_e8m0fnu": float8_e8m0fnu,
    "float4_e2m1fn_x2": float4_e2m1fn_x2,
}
