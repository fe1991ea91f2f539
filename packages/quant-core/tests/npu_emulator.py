"""A CPU emulator of the ``torch_npu`` ops our NPU kernels call, written from their documented semantics
(``../shared/reference/npu-ops.md``), independently of quant-core's own code.

Installed as the ``torch_npu`` module by the ``npu`` fixture (conftest.py), so the NPU code path runs here
and is checked against the same float references as every other backend. Layout-only details (FRACTAL_NZ)
are identities; arithmetic follows the documentation exactly (int32 accumulation, integer bias before
scaling, float bias after).
"""

import torch

ACL_FORMAT_FRACTAL_NZ = 29
calls: list[str] = []  # names of the ops called, in order (tests assert the NPU path really ran)


def _record(name: str) -> None:
    calls.append(name)


def _decode_scale(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.int64:  # fp32 bits in the low word (npu_trans_quant_param)
        return (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return scale.float()


def _unpack_int32_int4(words: torch.Tensor) -> torch.Tensor:
    """int32 words holding 8 int4 along the last dim, low nibble first -> int32 values in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    nib = torch.where(nib > 7, nib - 16, nib)
    return nib.reshape(*words.shape[:-1], words.shape[-1] * 8)


def _pack_int32_int4(values: torch.Tensor) -> torch.Tensor:
    v = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i in range(8):
        word |= v[..., i] << (4 * i)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def npu_format_cast(tensor: torch.Tensor, acl_format: int, *args, **kwargs) -> torch.Tensor:
    _record("npu_format_cast")
    return tensor


def npu_dynamic_quant(x: torch.Tensor, dst_type: torch.dtype = torch.int8, **kwargs):
    _record("npu_dynamic_quant")
    qmax = {torch.int8: 127, torch.quint4x2: 7}[dst_type]
    rows = x.reshape(-1, x.shape[-1]).double()
    scale = rows.abs().amax(dim=-1) / qmax
    q = torch.round(rows / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-qmax - 1, qmax).to(torch.int32)
    q = q.reshape(x.shape)
    if dst_type == torch.quint4x2:
        return _pack_int32_int4(q), scale.float()
    return q.to(torch.int8), scale.float()


def npu_quantize(x, scales, zero_points, dtype, axis=-1, div_mode=False):
    _record("npu_quantize")
    s = scales.double() if torch.is_tensor(scales) else torch.tensor(float(scales), dtype=torch.float64)
    along = [1] * x.dim()
    along[axis] = -1  # 1-D scales / zero points index dim `axis` of x
    s = s.reshape(along) if s.dim() == 1 else s
    v = x.double() / s if div_mode else x.double() * s
    if zero_points is not None:
        v = v + zero_points.double().reshape(along)
    if dtype == torch.quint4x2:
        return _pack_int32_int4(torch.round(v).clamp(-8, 7))
    return torch.round(v).clamp(-128, 127).to(torch.int8)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    _record("npu_convert_weight_to_int4pack")
    return _pack_int32_int4(weight)


def npu_trans_quant_param(scale: torch.Tensor, offset=None) -> torch.Tensor:
    _record("npu_trans_quant_param")
    return scale.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _int_operand(t: torch.Tensor) -> torch.Tensor:
    """An int8 operand, or an int32 one holding 8 int4 per word along its last dim, as int64 values."""
    if t.dtype == torch.int32:
        t = _unpack_int32_int4(t)
    return t.to(torch.int64)


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=torch.float16, **kw):
    _record("npu_quant_matmul")
    a = _int_operand(x1)  # [M, K]
    if x2.dtype == torch.int32 and x2.shape[0] * 8 == a.shape[-1]:
        b = _int_operand(x2.T).T  # a transposed view of [N, K/8]: packed along K
    else:
        b = _int_operand(x2)  # [K, N] int8, or [K, N/8] packed along N
    assert a.shape[-1] == b.shape[0], f"npu_quant_matmul: K mismatch {tuple(a.shape)} @ {tuple(b.shape)}"
    acc = a @ b
    assert acc.abs().max() < 2**31, "int32 accumulator overflow"
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.to(torch.int64)
    y = acc.double() * _decode_scale(scale).double()
    if pertoken_scale is not None:
        y = y * pertoken_scale.double().reshape(-1, 1)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.double()
    return y.to(output_dtype)


def npu_weight_quant_batchmatmul(
    x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None,
    antiquant_group_size=0,
):  # fmt: skip
    _record("npu_weight_quant_batchmatmul")
    w = _unpack_int32_int4(weight) if weight.dtype == torch.int32 else weight  # [K, N]
    w = w.double()
    k = w.shape[0]
    scale = antiquant_scale.double()
    offset = None if antiquant_offset is None else antiquant_offset.double()
    if antiquant_group_size:
        scale = scale.repeat_interleave(antiquant_group_size, dim=0)[:k]
        offset = None if offset is None else offset.repeat_interleave(antiquant_group_size, dim=0)[:k]
    w = (w + (0 if offset is None else offset)) * scale  # the offset is ADDED (npu convention)
    y = x.double() @ w
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def npu_kronecker_quant(x, left_trans, right_trans, clip_ratio=1.0, dst_dtype=torch.int32):
    _record("npu_kronecker_quant")
    # Upstream passes the checkpoint's left factor pre-transposed (A = Lᵀ); the op computes A · X · R, which
    # gives the transform msModelSlim's checkpoints were verified to carry: X̃ = Lᵀ · X · R (modelslim-tool §5).
    xt = left_trans.double() @ x.double() @ right_trans.double()  # [T, L, R]
    scale = clip_ratio * xt.abs().amax(dim=(-2, -1)) / 7
    q = torch.round(xt / torch.where(scale > 0, scale, 1.0)[:, None, None]).clamp(-8, 7)
    return _pack_int32_int4(q), scale.float()
