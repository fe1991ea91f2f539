"""MoE schemes' `apply` (backend auto = cpu here) against a float MoE with the same routing, same run.

The float baseline sorts the routed rows by expert exactly like our cpu path and runs each expert's block
through fp32 F.linear, so the ratio isolates the quantized kernels.
"""

import pytest
import torch
import torch.nn.functional as F

import quant_core
from quant_core.moe import sort_by_expert

E, H, I, K_TOP = 16, 1024, 512, 4  # noqa: E741 (the format spec's names)
TOKENS = [1, 32, 256]
SCHEMES = [
    ("W8A8_DYNAMIC", "W8A8_DYNAMIC", {}),
    ("W8A16", "W8A16", {}),
    ("W4A16-g128", "W4A16", {"group_size": 128}),
    ("W4A8_DYNAMIC", "W4A8_DYNAMIC", {}),
]
_EXPERTS: list = []


def experts():
    if not _EXPERTS:
        g = torch.Generator().manual_seed(0)
        _EXPERTS.extend([torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5])
    return _EXPERTS


def routing(t: int):
    g = torch.Generator().manual_seed(t)
    weights, ids = torch.topk(torch.rand(t, E, generator=g), K_TOP, dim=-1)
    return torch.softmax(weights, -1), ids


def float_moe(x, w13, w2, topk_weights, topk_ids):
    order, counts = sort_by_expert(topk_ids, E)
    rows = order // topk_ids.shape[1]
    xs, ys, start = x[rows], torch.empty(order.numel(), x.shape[1]), 0
    for e, count in enumerate(counts.tolist()):
        if count:
            h = F.linear(xs[start : start + count], w13[e])
            ys[start : start + count] = F.linear(F.silu(h[:, :I]) * h[:, I:], w2[e])
            start += count
    out = torch.zeros_like(x)
    return out.index_add_(0, rows, ys * topk_weights.reshape(-1)[order, None])


def shape_label() -> str:
    return f"E{E} H{H} I{I} top{K_TOP}"


@pytest.mark.parametrize("t", TOKENS)
def test_fp32_moe(benchmark, t):
    benchmark.extra_info.update(kind="moe", scheme="fp32", shape=shape_label(), M=t)
    benchmark.group = f"moe T={t}"
    weights, ids = routing(t)
    benchmark(float_moe, torch.randn(t, H), *experts(), weights, ids)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize(("name", "quant_type", "options"), SCHEMES, ids=[s[0] for s in SCHEMES])
def test_quantized_moe(benchmark, name, quant_type, options, t):
    if (quant_type, "moe") not in quant_core.DEFAULT_REGISTRY:
        pytest.skip(f"{quant_type} MoE is not implemented")
    moe = quant_core.get_scheme(quant_type, "moe", **options)
    runtime = moe.process_weights(moe.quantize_weights(*experts()))
    benchmark.extra_info.update(kind="moe", scheme=name, shape=shape_label(), M=t)
    benchmark.group = f"moe T={t}"
    weights, ids = routing(t)
    benchmark(moe.apply, runtime, torch.randn(t, H), weights, ids)
