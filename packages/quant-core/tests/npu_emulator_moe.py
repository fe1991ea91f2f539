"""Emulated torch_npu MoE ops (routing, grouped matmul, fused SwiGLU requant), from ``npu-ops.md``.

Re-exported by ``npu_emulator`` so they appear as ``torch_npu.<op>``. Conventions we had to choose where the
documentation is silent (inferred): the routing permutation ``expanded_row_idx`` / ``sorted_indices`` maps a
sorted row to the flat ``token * k + slot`` index it came from, and sorting is stable within an expert.
"""

import npu_emulator
import torch
import torch.nn.functional as F


def _decode(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.int64:
        return (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32).double()
    return scale.double()


def _dynamic_quant_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rows.double()
    scale = rows.abs().amax(dim=-1) / 127
    q = torch.round(rows / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale.float()


def npu_moe_init_routing_v2(
    x, topk_ids, scale=None, active_num=None, expert_num=None, expert_tokens_num_type=1,
    active_expert_range=None, quant_mode=-1, **kwargs,
):  # fmt: skip
    npu_emulator._record("npu_moe_init_routing_v2")
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expanded_x = x[order // k]
    counts = torch.bincount(flat, minlength=expert_num)
    tokens = counts if expert_tokens_num_type == 1 else torch.cumsum(counts, 0)
    if quant_mode == 1:
        q, s = _dynamic_quant_rows(expanded_x)
        return q, order.to(torch.int32), tokens, s
    return expanded_x, order.to(torch.int32), tokens, None


def _groups(group_list: torch.Tensor, group_list_type: int) -> list[tuple[int, int]]:
    ends = torch.cumsum(group_list, 0) if group_list_type == 1 else group_list
    bounds, start = [], 0
    for end in ends.tolist():
        bounds.append((start, int(end)))
        start = int(end)
    return bounds


def npu_grouped_matmul(
    x, weight, *, bias=None, scale=None, per_token_scale=None, antiquant_scale=None, antiquant_offset=None,
    group_list=None, group_list_type=0, group_type=0, split_item=0, output_dtype=None, **kwargs,
):  # fmt: skip
    npu_emulator._record("npu_grouped_matmul")
    rows, w = x[0], weight[0]  # [M, K], stacked [E, K, N]
    out_dtype = output_dtype or rows.dtype
    y = torch.zeros(rows.shape[0], w.shape[-1] * (8 if w.dtype == torch.int32 else 1), dtype=torch.float64)
    acc_out = out_dtype == torch.int32
    if acc_out:
        y = y.to(torch.int64)
    for e, (start, end) in enumerate(_groups(group_list, group_list_type)):
        if end == start:
            continue
        block, we = rows[start:end], w[e]
        if we.dtype == torch.int32:  # 8 int4 per word along N
            we = npu_emulator._unpack_int32_int4(we)
        if antiquant_scale is not None:  # weight-only: (w + offset) * scale, per channel or per group along K
            s = antiquant_scale[0][e].double()
            o = 0 if antiquant_offset is None else antiquant_offset[0][e].double()
            if s.dim() == 2 and s.shape[0] != we.shape[0]:  # [K/g, N] group scales
                g = we.shape[0] // s.shape[0]
                s = s.repeat_interleave(g, dim=0)
                o = o if isinstance(o, int) else o.repeat_interleave(g, dim=0)
            y[start:end] = block.double() @ ((we.double() + o) * s)
            continue
        acc = block.to(torch.int64) @ we.to(torch.int64)
        assert acc.abs().max() < 2**31, "int32 accumulator overflow"
        if acc_out:
            y[start:end] = acc
            continue
        out = acc.double() * _decode(scale[0][e]).reshape(-1)
        if per_token_scale is not None:
            out = out * per_token_scale[0][start:end].double()[:, None]
        y[start:end] = out
    if bias is not None and not acc_out and antiquant_scale is not None:
        raise NotImplementedError("bias with antiquant is not emulated")
    return [y.to(out_dtype)]


def npu_dequant_swiglu_quant(
    x, weight_scale, activation_scale, bias=None, quant_scale=None, quant_offset=None, group_index=None,
    activate_left=True, quant_mode=1, **kwargs,
):  # fmt: skip
    npu_emulator._record("npu_dequant_swiglu_quant")
    f = torch.empty(x.shape, dtype=torch.float64)
    for e, (start, end) in enumerate(_groups(group_index, 1)):
        f[start:end] = x[start:end].double() * _decode(weight_scale[e]).reshape(-1)
    f = f * activation_scale.double()[:, None]
    half = f.shape[-1] // 2
    a, b = f[:, :half], f[:, half:]
    h = F.silu(a) * b if activate_left else a * F.silu(b)
    return _dynamic_quant_rows(h)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, **kwargs):
    npu_emulator._record("npu_moe_token_unpermute")
    k = 1 if probs is None else probs.shape[1]
    flat = torch.zeros(permuted_tokens.shape, dtype=torch.float64)
    flat[sorted_indices.long()] = permuted_tokens.double()
    flat = flat.reshape(-1, k, permuted_tokens.shape[-1])
    if probs is not None:
        flat = flat * probs.double()[..., None]
    return flat.sum(1).to(permuted_tokens.dtype)


def npu_swiglu(x, dim=-1):
    npu_emulator._record("npu_swiglu")
    a, b = x.chunk(2, dim)
    return F.silu(a) * b
