"""Checkpoint features beyond plain quantized linears, in a real engine: C8 KV-cache scales, the extra biases of
msModelSlim's anti-outlier pass, a quantized lm_head (a quantized embedding: test_embedding.py)."""

import logging

import pytest
import torch
from conftest import (
    assert_greedy,
    c8_checkpoint_tensors,
    c8_tensors,
    generate,
    max_logprob_diff,
    quantize_layer,
    runtime_logprobs,
)

# As in test_schemes.py: same kernels on both sides, 2e-2 nats covers batching / attention differences.
LOGPROB_TOL = 2e-2


def test_c8_checkpoint_loads_with_scales_kept_and_one_warning(checkpoints, caplog):
    model_dir = checkpoints.quantized("qwen3", "W8A8_DYNAMIC", "qwen3-W8A8_DYNAMIC-C8", kv_cache="C8")
    with caplog.at_level(logging.WARNING, logger="vllm_adapter"):
        gen, kept = generate(model_dir, probe=c8_tensors)
    warnings = [r for r in caplog.records if r.name.startswith("vllm_adapter") and "C8" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "ModelSlimC8KVCacheMethod" in gen.methods
    expected = c8_checkpoint_tensors(model_dir)
    assert len(expected) == 8 and set(kept[0]) == set(expected)  # 2 layers × k/v × scale/offset
    for name, tensor in expected.items():
        assert torch.equal(kept[0][name], tensor), name
    # The cache stays in the model dtype, so the engine computes what the runtime computes (it ignores C8 scales).
    reference = runtime_logprobs(model_dir, gen)
    assert max_logprob_diff(gen, reference) < LOGPROB_TOL
    assert_greedy(gen, reference, LOGPROB_TOL)


def m4_biases(tensors: dict, desc: dict) -> None:
    """What msModelSlim's anti-outlier m4 adds (modelslim-tool.md §4.10): bf16 biases on q/k/v and gate/up, F32 biases
    on the layer norms and Qwen3's q/k norms, all FLOAT. Qwen3 has no biases of its own."""
    gen = torch.Generator().manual_seed(4)
    added = {}
    for name, tensor in list(tensors.items()):
        prefix, _, suffix = name.rpartition(".")
        if suffix != "weight":
            continue
        if prefix.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            rows = tensor.shape[0] * (2 if tensor.dtype == torch.int8 and desc[name].startswith("W4") else 1)
            added[f"{prefix}.bias"] = (0.3 * torch.randn(rows, generator=gen)).to(torch.bfloat16)
        elif prefix.endswith(("layernorm", "q_norm", "k_norm")):
            added[f"{prefix}.bias"] = 0.3 * torch.randn(tensor.shape[0], generator=gen)
    tensors.update(added)
    desc.update(dict.fromkeys(added, "FLOAT"))


def test_anti_outlier_biases_load_and_apply(checkpoints):
    plain = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")
    model_dir = checkpoints.edited(plain, "qwen3-W8A8_DYNAMIC-m4", m4_biases)
    gen, _ = generate(model_dir)
    reference = runtime_logprobs(model_dir, gen)  # quant-core's runtime applies them (checked there against float)
    diff = max_logprob_diff(gen, reference)
    assert diff < LOGPROB_TOL, f"engine vs runtime logprobs differ by {diff:.3g}"
    assert_greedy(gen, reference, LOGPROB_TOL)
    # The biases matter: without them the same tokens score differently by far more than the tolerance.
    assert max_logprob_diff(gen, runtime_logprobs(plain, gen)) > 10 * LOGPROB_TOL


def test_quantized_lm_head(checkpoints):
    """A vocabulary vLLM pads (400 -> 448 rows) and an lm_head quantized W8A8_DYNAMIC, written like any linear."""
    base = checkpoints.quantized("qwen3", "W8A16", "qwen3-vocab400-W8A16", float_overrides={"vocab_size": 400})
    model_dir = checkpoints.edited(
        base, "qwen3-vocab400-lm_head", lambda t, d: quantize_layer(t, d, "lm_head", "W8A8_DYNAMIC")
    )
    gen, _ = generate(model_dir, max_tokens=4)
    assert "ModelSlimEmbeddingMethod" in gen.methods
    reference = runtime_logprobs(model_dir, gen)  # the runtime runs lm_head as a W8A8_DYNAMIC linear
    diff = max_logprob_diff(gen, reference)
    assert diff < LOGPROB_TOL, f"engine vs runtime logprobs differ by {diff:.3g}"
    assert_greedy(gen, reference, LOGPROB_TOL)
    assert max_logprob_diff(gen, runtime_logprobs(base, gen)) > 1e-3  # the quantized head is what ran


def _per_linear_clip_ratios(tensors: dict, desc: dict) -> None:
    """What msModelSlim writes for int8 FlatQuant: transforms shared by q/k/v (and gate/up), one clip_ratio each."""
    for i, name in enumerate(n for n in sorted(tensors) if n.endswith(".clip_ratio")):
        tensors[name] = torch.tensor([0.95 + 0.001 * (i % 7)])


@pytest.mark.parametrize("scheme", ["W8A8_FLATQUANT_DYNAMIC", "W4A8_FLATQUANT_DYNAMIC"])
def test_int8_flatquant_fused_shards_may_carry_their_own_clip_ratio(checkpoints, scheme):
    # int8 activations do not use clip_ratio (the scheme validates it only), so shards that disagree on it still
    # share one fused matmul; the engine must compute what the runtime computes on the unfused linears.
    base = checkpoints.quantized("qwen3", scheme)
    model_dir = checkpoints.edited(base, f"qwen3-{scheme}-clips", _per_linear_clip_ratios)
    gen, _ = generate(model_dir)
    reference = runtime_logprobs(model_dir, gen)
    assert max_logprob_diff(gen, reference) < LOGPROB_TOL
    assert_greedy(gen, reference, LOGPROB_TOL)
