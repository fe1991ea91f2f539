import pytest
import torch
import torch.nn.functional as F
from linear_cases import fake_quant_per_token, rel_err

import quant_core
from quant_core import CheckpointTensorError
from quant_core.moe import stack_experts


def experts(e: int, h: int, i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5


def routing(t: int, e: int, k: int, seed: int = 0, skip_expert: int | None = None):
    """Random top-k routing (distinct experts per token) with softmax weights; optionally one expert gets nothing."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, e, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0
    weights, ids = torch.topk(scores, k, dim=-1)
    return torch.softmax(weights, dim=-1), ids


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[..., N/2, K] int8 -> [..., N, K]: row 2j is the low nibble, row 2j+1 the high one (two's complement)."""
    b = packed.to(torch.int32) & 0xFF
    low, high = b & 0xF, b >> 4
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=-2).reshape(*packed.shape[:-2], -1, packed.shape[-1])


def per_group(t: torch.Tensor, k: int) -> torch.Tensor:
    """[E, N, G] scales -> [E, N, K], each group's value repeated over its K / G inputs."""
    return t.double().repeat_interleave(k // t.shape[-1], dim=-1)


def dequant(tensors: dict, proj: str, quant_type: str = "W8A8_DYNAMIC") -> torch.Tensor:
    """float64 stacked expert weights [E, N, K] from checkpoint tensors, written from the format spec."""
    w = tensors[f"{proj}_weight"]
    q = unpack_rows(w).double() if quant_type in ("W4A16", "W4A8_DYNAMIC") else w.double()
    k = q.shape[-1]
    scale = per_group(tensors[f"{proj}_weight_scale"], k)
    if quant_type in ("W8A16", "W4A16"):
        return (q - per_group(tensors[f"{proj}_weight_offset"], k)) * scale
    if f"{proj}_weight_scale_second" in tensors:
        scale = scale * per_group(tensors[f"{proj}_weight_scale_second"], k)
    return q * scale


def moe_reference(x, w13, w2, topk_weights, topk_ids, act_quant: bool) -> torch.Tensor:
    """float64 MoE (format §8.4): per token and routed expert, gmm1 -> SwiGLU -> gmm2, weighted sum."""
    fq = (lambda v: fake_quant_per_token(v, 127)) if act_quant else (lambda v: v.double())
    out = torch.zeros(x.shape, dtype=torch.float64)
    xq = fq(x)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            hidden = w13[e] @ xq[t]
            act = F.silu(hidden[:inter]) * hidden[inter:]
            out[t] += float(topk_weights[t, j]) * (w2[e] @ fq(act[None])[0])
    return out


# Exact backends (reference, npu, and cpu: its fbgemm kernels take the spec's own per-token int8 codes, see
# test_w8a8_dynamic.py): integer matmuls are exact; the float64 reference differs only where a requantized SwiGLU
# value sits on a rounding tie in float32 but not float64 (one LSB, 1/127 of one term) and in float32 epilogues.
# 1e-3 catches any real error (a wrong half of w13, a missing router weight, a wrong scale: ≥ 1e-1; the old 7-bit
# cpu activation grid: ≈ 1.5 % per GEMM). Measured max: reference 2.2e-7, cpu 1.2e-7.
EXACT = 1e-3


# (quant type, group size, activations quantized per token)
SCHEMES = [
    ("W8A8_DYNAMIC", 0, True),
    ("W4A8_DYNAMIC", 0, True),
    ("W4A8_DYNAMIC", 32, False),  # the two-step per-group form computes with float activations
    ("W8A16", 0, False),
    ("W4A16", 32, False),
]
# Weight-only on float32: float32 vs float64 rounding only (1e-6); 1e-4 catches any real error.
FLOAT_EXACT = 1e-4
# bf16 fast CPU kernels (int8pack / int4pack take bf16 activations): 2^-8 relative per GEMM, two GEMMs.
BF16_KERNELS = 2e-2


def tolerance(backend: str, act_quant: bool) -> float:
    if act_quant:
        return EXACT
    return BF16_KERNELS if backend == "cpu" else FLOAT_EXACT


@pytest.mark.parametrize(("quant_type", "group", "act_quant"), SCHEMES, ids=[f"{q}-g{g}" for q, g, _ in SCHEMES])
@pytest.mark.parametrize(
    ("t", "e", "h", "i", "k"),
    [(1, 4, 64, 32, 1), (7, 8, 96, 64, 2), (33, 16, 576, 64, 8), (512, 8, 64, 32, 2)],
)
def test_moe_matches_float64_reference(backend, quant_type, group, act_quant, t, e, h, i, k):
    moe = quant_core.get_scheme(quant_type, "moe", backend=backend, group_size=group)
    w13, w2 = experts(e, h, i)
    tensors = moe.quantize_weights(w13, w2)
    runtime = moe.process_weights(tensors, layer="model.layers.0.mlp")
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1))
    weights, ids = routing(t, e, k, skip_expert=e - 1 if k < e else None)
    y = moe.apply(runtime, x, weights, ids)
    assert y.shape == (t, h) and y.dtype == x.dtype
    w13_deq, w2_deq = dequant(tensors, "w13", quant_type), dequant(tensors, "w2", quant_type)
    ref = moe_reference(x, w13_deq, w2_deq, weights, ids, act_quant=act_quant)
    assert rel_err(y, ref) < tolerance(backend, act_quant)


@pytest.mark.parametrize(
    ("quant_type", "group", "bound"), [("W8A16", 0, 2e-2), ("W4A16", 32, 0.2), ("W4A8_DYNAMIC", 0, 0.25)]
)
def test_moe_round_trip_of_other_schemes(quant_type, group, bound):
    # Against the float MoE: int8 weights ≈1 % per GEMM; int4 ≈9-13 % per GEMM (see the linear tests), two GEMMs.
    moe = quant_core.get_scheme(quant_type, "moe", backend="reference", group_size=group)
    w13, w2 = experts(4, 64, 32)
    runtime = moe.process_weights(moe.quantize_weights(w13, w2))
    x = torch.randn(16, 64)
    weights, ids = routing(16, 4, 2)
    ref = moe_reference(x, w13.double(), w2.double(), weights, ids, act_quant=False)
    assert rel_err(moe.apply(runtime, x, weights, ids), ref) < bound


def test_w4a8_moe_writes_row_parallel_scale_bias_for_w2():
    moe = quant_core.get_scheme("W4A8_DYNAMIC", "moe")
    tensors = moe.quantize_weights(*experts(2, 64, 32))
    assert tensors["w13_weight"].shape == (2, 32, 64) and tensors["w13_scale_bias"].shape == (2, 64, 1)
    assert tensors["w2_weight"].shape == (2, 32, 32) and tensors["w2_scale_bias"].shape == (2, 64, 16)
    specs = moe.weight_specs(2, 64, 32, torch.bfloat16)
    assert set(specs) == set(tensors)
    for name, tensor in tensors.items():
        specs[name].check(tensor)


def test_npu_moe_runs_upstreams_grouped_pipeline(npu):
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="npu")
    runtime = moe.process_weights(moe.quantize_weights(*experts(4, 64, 32)))
    assert runtime["npu"]["w13_weight"].shape == (4, 64, 64) and runtime["npu"]["w2_weight"].shape == (4, 32, 64)
    npu.clear()
    weights, ids = routing(5, 4, 2)
    moe.apply(runtime, torch.randn(5, 64).bfloat16(), weights, ids)
    assert npu == [
        "npu_moe_init_routing_v2",
        "npu_grouped_matmul",
        "npu_dequant_swiglu_quant",
        "npu_grouped_matmul",
        "npu_moe_token_unpermute",
    ]


def test_npu_moe_without_torch_npu_explains():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="npu")
    with pytest.raises(quant_core.QuantCoreError, match="torch_npu is not installed"):
        moe.process_weights(moe.quantize_weights(*experts(2, 64, 32)), layer="model.layers.3.mlp.experts")


def test_moe_round_trip_against_the_float_moe():
    # int8 weights and int8 per-token activations on both GEMMs: ≈1 % each; 4e-2 bounds the sum with margin.
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="reference")
    w13, w2 = experts(4, 64, 32)
    runtime = moe.process_weights(moe.quantize_weights(w13, w2))
    x = torch.randn(16, 64)
    weights, ids = routing(16, 4, 2)
    ref = moe_reference(x, w13.double(), w2.double(), weights, ids, act_quant=False)
    assert rel_err(moe.apply(runtime, x, weights, ids), ref) < 4e-2


def test_bf16_activations():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="reference")
    w13, w2 = experts(4, 64, 32)
    tensors = moe.quantize_weights(w13, w2)
    x = torch.randn(8, 64).bfloat16()
    weights, ids = routing(8, 4, 2)
    y = moe.apply(moe.process_weights(tensors), x, weights, ids)
    assert y.dtype == torch.bfloat16
    # bf16 rounding of the SwiGLU intermediate and of the output: ~2^-8 each.
    ref = moe_reference(x, dequant(tensors, "w13"), dequant(tensors, "w2"), weights, ids, act_quant=True)
    assert rel_err(y, ref) < 2e-2


def test_weight_specs_are_the_stacked_linear_specs():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe")
    specs = moe.weight_specs(8, 64, 32, torch.bfloat16)
    assert specs["w13_weight"].shape == (8, 64, 64) and specs["w2_weight"].shape == (8, 64, 32)
    assert specs["w13_weight_scale"].shape == (8, 64, 1) and specs["w2_weight_scale"].shape == (8, 64, 1)
    assert specs["w13_weight"].output_dim == 1 and specs["w13_weight"].input_dim == 2
    tensors = moe.quantize_weights(*experts(8, 64, 32))
    assert set(tensors) == set(specs)
    for name, tensor in tensors.items():
        specs[name].check(tensor)


def test_stack_experts_matches_per_expert_tensors():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="reference")
    w13, w2 = experts(3, 64, 32)
    stacked = moe.quantize_weights(w13, w2)
    linear = quant_core.get_scheme("W8A8_DYNAMIC", "linear")
    per_expert = {}
    for e in range(3):
        for proj, w in (("gate_proj", w13[e, :32]), ("up_proj", w13[e, 32:]), ("down_proj", w2[e])):
            for suffix, t in linear.quantize_weights(w).items():
                per_expert[f"model.layers.0.mlp.experts.{e}.{proj}.{suffix}"] = t
    per_expert["model.layers.0.mlp.gate.weight"] = torch.randn(3, 64)  # the router is not an expert tensor
    restacked = stack_experts(per_expert, layer="model.layers.0.mlp")
    assert set(restacked) == set(stacked)
    for name in stacked:
        assert torch.equal(restacked[name], stacked[name]), name


def test_stack_experts_with_mixtral_names_and_errors():
    t = {f"experts.{e}.{p}.weight": torch.full((2, 4), e) for e in range(2) for p in ("w1", "w2", "w3")}
    out = stack_experts(t, projections=("w1", "w3", "w2"))
    assert out["w13_weight"].shape == (2, 4, 4) and out["w2_weight"].shape == (2, 2, 4)
    del t["experts.1.w3.weight"]
    with pytest.raises(CheckpointTensorError, match=r"experts\.1\.w3\.weight is missing"):
        stack_experts(t, projections=("w1", "w3", "w2"))
    t["experts.1.w3.weight"] = torch.zeros(3, 4)
    with pytest.raises(CheckpointTensorError, match="experts disagree on shape"):
        stack_experts(t, projections=("w1", "w3", "w2"))
    with pytest.raises(CheckpointTensorError, match="no tensors named like"):
        stack_experts({"mlp.gate.weight": torch.zeros(2)})


@pytest.fixture(scope="module")
def small_moe():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="reference")
    return moe, moe.process_weights(moe.quantize_weights(*experts(4, 64, 32)))


@pytest.mark.parametrize(
    ("x", "ids", "weights", "match"),
    [
        (torch.randn(3, 64), torch.tensor([[0], [4], [1]]), torch.ones(3, 1), r"ids in \[0, 4\] but this layer has 4"),
        (torch.randn(3, 64), torch.tensor([[0], [-1], [1]]), torch.ones(3, 1), "expert ids"),
        (torch.randn(3, 64), torch.tensor([[0], [1]]), torch.ones(2, 1), "must both be"),
        (torch.randn(3, 64), torch.zeros(3, 1), torch.ones(3, 1), "integer tensor"),
        (torch.randn(2, 3, 64), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), r"\[tokens, hidden\]"),
    ],
)
def test_bad_routing_is_refused(small_moe, x, ids, weights, match):
    moe, runtime = small_moe
    with pytest.raises(ValueError, match=match):
        moe.apply(runtime, x, weights, ids)


def test_mismatched_expert_counts_are_refused():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="reference")
    tensors = moe.quantize_weights(*experts(4, 64, 32))
    tensors["w2_weight_scale"] = tensors["w2_weight_scale"][:3]
    with pytest.raises(ValueError, match=r"w2_weight_scale do not have 4 experts"):
        moe.process_weights(tensors, layer="model.layers.1.mlp")
    tensors = moe.quantize_weights(*experts(4, 64, 32))
    tensors["w13_weight_scale"][2, 5, 0] = float("nan")
    with pytest.raises(CheckpointTensorError, match=r"model\.layers\.1\.mlp\.experts\.2\.w13\.weight_scale"):
        moe.process_weights(tensors, layer="model.layers.1.mlp")


def test_unsupported_activation():
    moe = quant_core.get_scheme("W8A8_DYNAMIC", "moe", backend="reference")
    runtime = moe.process_weights(moe.quantize_weights(*experts(2, 64, 32)))
    with pytest.raises(ValueError, match="activation 'relu'"):
        moe.apply(runtime, torch.randn(2, 64), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), "relu")
