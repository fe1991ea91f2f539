"""Tiny float source models for msModelSlim, built INSIDE the msModelSlim venv (transformers 4.51.0).

    <msms-venv>/bin/python build_models.py OUT_DIR

Writes ``OUT_DIR/{qwen3-bf16,qwen3-fp16,qwen3-fp32,qwen3_moe-bf16}``: random weights (seed 0), untied lm_head, the
geometry of modelslim-tool.md §1.3, and a byte-level BPE tokenizer saved as ``Qwen2Tokenizer`` with the
``vocab.json`` + ``merges.txt`` that msModelSlim's slow-tokenizer load needs (§1.4). The tokenizer is trained
offline on this interpreter's own standard-library sources. The three dense copies share the same weights; only
the storage dtype differs (fp16 gives int64 ``deq_scale``, fp32 gets past the GPTQ dtype bug).

Runs in the msModelSlim environment only: it must not import quant_core (transformers 4.51 lives there).
"""

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DENSE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def training_text() -> list[str]:
    """Local text for the BPE merges: the first stdlib modules by name (stable for one Python version)."""
    stdlib = Path(json.__file__).parent.parent
    return [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py"))[:60]]


def train_tokenizer(out_dir: Path) -> transformers.PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_text(), trainer)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.model.save(tmp)
        tokenizer = transformers.Qwen2TokenizerFast(
            vocab_file=vocab_file,
            merges_file=merges_file,
            tokenizer_object=bpe,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token=None,
            unk_token=None,
        )
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(out_dir)
    # The slow tokenizer msModelSlim uses must load from what was saved.
    transformers.Qwen2Tokenizer(vocab_file=str(out_dir / "vocab.json"), merges_file=str(out_dir / "merges.txt"))
    return tokenizer


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # the default init is tiny; a wider spread makes the logits depend on every layer
        for _, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
    return model


def build(out_root: Path) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out_root / "tokenizer"
    tokenizer = train_tokenizer(tokenizer_dir)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    dense = random_model(transformers.Qwen3Config(**DENSE, **ids))
    moe = random_model(transformers.Qwen3MoeConfig(**DENSE, **MOE, **ids))
    targets = [(f"qwen3-{name}", dense, dtype) for name, dtype in DTYPES.items()] + [
        ("qwen3_moe-bf16", moe, torch.bfloat16)
    ]
    for name, model, dtype in targets:
        out = out_root / name
        copy.deepcopy(model).to(dtype).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        print(f"built {out} ({model.config.model_type}, {dtype})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
