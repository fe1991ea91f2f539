"""A quantized ``embed_tokens`` in a real engine (``ModelSlimVocabEmbeddingMethod``), also with a head tied to it
(``ModelSlimTiedHeadMethod``) and across two tensor-parallel ranks, against quant-core's transformers runtime
(``QuantEmbedding``) on the same checkpoint. msModelSlim never writes one; `quant-core quantize` does when a rule
names the embedding (``*.embed_tokens=SCHEME``)."""

import pytest
from conftest import assert_greedy, generate, max_logprob_diff, quantize_layer, runtime_logprobs, start_engine

from quant_core import UnsupportedSchemeError

# As in test_schemes.py: both sides run quant-core's kernels (the lookup is the same function on both); attention and
# batching differences move fp32 logprobs by ~1e-5, a per-token rounding flip in rare rows by more: 2e-2 nats bounds
# that, while a wrong row, nibble or scale in the table moves logprobs by > 0.1 (random embeddings).
LOGPROB_TOL = 2e-2
# vocab 400: vLLM pads the table to 448 rows (a multiple of 64), so the padding is cut off before the lookup
CASES = [
    ("qwen3", "W8A16", {"float_overrides": {"vocab_size": 400}}),
    ("qwen3", "W4A16", {"group_size": 32}),  # packed: vocab rows 2j / 2j+1 share a byte row
    ("llama", "W8A8_DYNAMIC", {"float_overrides": {"tie_word_embeddings": True}}),  # no-prefix embedding, tied head
]


@pytest.mark.parametrize(("kind", "scheme", "options"), CASES, ids=[f"{k}-{s}" for k, s, _ in CASES])
def test_quantized_embedding_matches_transformers_runtime(checkpoints, kind, scheme, options):
    suffix = "".join(f"-{k}{v}" for k, v in sorted(options.get("float_overrides", {}).items()))
    float_table = {k: v for k, v in options.items() if k != "group_size"}  # no grouped layer left without the table
    plain = checkpoints.quantized(kind, "W8A16", f"{kind}-W8A16{suffix}", **float_table)  # the same model otherwise
    model_dir = checkpoints.quantized(kind, "W8A16", f"{kind}-embed-{scheme}{suffix}",
                                      layer_schemes=[f"*.embed_tokens={scheme}"], **options)  # fmt: skip
    gen, _ = generate(model_dir)
    assert "ModelSlimVocabEmbeddingMethod" in gen.methods
    tied = options.get("float_overrides", {}).get("tie_word_embeddings", False)
    assert ("ModelSlimTiedHeadMethod" in gen.methods) == tied
    reference = runtime_logprobs(model_dir, gen)
    diff = max_logprob_diff(gen, reference)
    assert diff < LOGPROB_TOL, f"engine vs runtime logprobs differ by {diff:.3g}"
    assert_greedy(gen, reference, LOGPROB_TOL)
    # the quantized table (and tied head) is what ran: the float-table checkpoint scores the same tokens otherwise
    assert max_logprob_diff(gen, runtime_logprobs(plain, gen)) > 1e-3


@pytest.fixture
def tp_env(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one NUMA node: the default auto-binding refuses 2
    monkeypatch.setenv("MODELSLIM_BACKEND", "reference")  # exact partial sums (see test_tensor_parallel.py)


def test_two_ranks_equal_one(checkpoints, tp_env):
    """Vocabulary rows split 224 | 176 (+ 48 padding rows on rank 1), int4 byte rows split by half as many, ids owned
    by the other rank masked by vLLM; the tied head computes each rank's logit columns. fp32 with the reference
    kernels: the lookup is exact and each logit is computed on one rank, so TP=2 must equal TP=1 up to float32
    summation order in the rest of the model (test_tensor_parallel.py's 5e-3 bound); a wrong shard offset or
    nibble gives other tokens."""
    overrides = {"vocab_size": 400, "tie_word_embeddings": True}
    model_dir = checkpoints.quantized("qwen2", "W8A16", "qwen2-tied-embed-W4A16-tp", group_size=32,
                                      layer_schemes=["*.embed_tokens=W4A16"], float_overrides=overrides)  # fmt: skip
    one, _ = generate(model_dir)
    two, _ = generate(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert {"ModelSlimVocabEmbeddingMethod", "ModelSlimTiedHeadMethod"} <= set(one.methods)
    assert max(one.prompt_ids + one.tokens[:-1]) >= 224, "no id of rank 1's rows was looked up"
    assert two.tokens == one.tokens
    diff = max(abs(a - b) for a, b in zip(one.logprobs, two.logprobs, strict=True))
    assert diff < 5e-3, f"TP=2 vs TP=1 logprobs differ by {diff:.3g}"


def test_embedding_scheme_without_a_lookup_is_refused(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A16")
    model_dir = checkpoints.edited(
        base, "qwen3-embed-W4A4_DYNAMIC", lambda t, d: quantize_layer(t, d, "model.embed_tokens", "W4A4_DYNAMIC")
    )
    with pytest.raises(UnsupportedSchemeError, match=r"(?s)model\.embed_tokens.*W4A4_DYNAMIC.*W8A16, W8A8_DYNAMIC"):
        start_engine(model_dir)


def test_quantized_head_from_a_tied_table(checkpoints):
    """``lm_head=W8A8_DYNAMIC`` on a tied model: the quantizer writes the head's own tensors from the table (smoothed
    into the final norm) and unties the config, so vLLM loads a quantized ``ParallelLMHead`` beside the float table."""
    tied = {"tie_word_embeddings": True}
    plain = checkpoints.quantized("llama", "W8A16", "llama-W8A16-tie_word_embeddingsTrue", float_overrides=tied)
    model_dir = checkpoints.quantized("llama", "W8A16", "llama-head-W8A8_DYNAMIC", float_overrides=tied,
                                      layer_schemes=["lm_head=W8A8_DYNAMIC"], smooth_head=0.3,
                                      calib=checkpoints.root / "calib.txt")  # fmt: skip
    gen, _ = generate(model_dir)
    assert "ModelSlimEmbeddingMethod" in gen.methods  # the quantized head
    assert not {"ModelSlimVocabEmbeddingMethod", "ModelSlimTiedHeadMethod"} & set(gen.methods)  # float table, untied
    reference = runtime_logprobs(model_dir, gen)
    diff = max_logprob_diff(gen, reference)
    assert diff < LOGPROB_TOL, f"engine vs runtime logprobs differ by {diff:.3g}"  # as the tests above
    assert_greedy(gen, reference, LOGPROB_TOL)
    assert max_logprob_diff(gen, runtime_logprobs(plain, gen)) > 1e-3  # the quantized head is what ran
