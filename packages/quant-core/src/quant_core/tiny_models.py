"""Tiny random-weight Hugging Face checkpoints, built offline, for tests and demos.

``make_tiny_model("qwen3", out_dir)`` writes ``config.json``, ``generation_config.json``, ``model.safetensors``
and a byte-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that needs no download. Kinds:
``llama``, ``qwen2``, ``qwen3`` (dense) and ``qwen3_moe``. Sizes are tiny but keep the structure real models
have: grouped-query attention (4 heads, 2 KV heads, so tensor parallelism of 2 works), q/k/v biases on Qwen2,
q/k norms on Qwen3, routed experts with top-2 routing on Qwen3-MoE.

Needs the ``hf`` extra (transformers, tokenizers, safetensors).
"""

from pathlib import Path

import torch

KINDS = ("llama", "qwen2", "qwen3", "qwen3_moe")
COMMON = {
    "vocab_size": 384,  # 256 byte tokens + specials, rounded up
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
SPECIAL_TOKENS = {"<s>": 256, "</s>": 257, "<unk>": 258, "<pad>": 259}


def tiny_config(kind: str, **overrides):
    """The transformers config of a tiny ``kind`` model."""
    import transformers

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    fields = dict(COMMON)
    if kind == "llama":
        config_class = transformers.LlamaConfig
    elif kind == "qwen2":
        config_class = transformers.Qwen2Config
    elif kind == "qwen3":
        config_class = transformers.Qwen3Config
        fields["head_dim"] = 32
    else:
        config_class = transformers.Qwen3MoeConfig
        fields.update(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      decoder_sparse_step=1, norm_topk_prob=True)  # fmt: skip
    fields.update(overrides)
    return config_class(**fields)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is one token. Offline, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
    vocab.update(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_tiny_model(
    kind: str, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **config_overrides
) -> Path:
    """Write a tiny random-weight ``kind`` checkpoint (safetensors) plus tokenizer to ``out_dir``."""
    import transformers

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = tiny_config(kind, **config_overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init is tiny; a wider spread gives outputs that depend on every layer
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    model.to(dtype).save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir
