"""The mapping tables, as plain data.

``PACKED_MODULES`` maps a Hugging Face ``model_type`` to its fused-module table: the name of a module vLLM
fuses (``qkv_proj``) -> the checkpoint modules it is built from (``q_proj``, ``k_proj``, ``v_proj``). The
``experts`` entry lists expert 0 only: ModelSlim checkpoints give every expert the same scheme, so expert 0
speaks for all of them.

``PREFIX_REMAPS`` and ``SUBSTRING_REMAPS`` turn a vLLM module prefix into the name the checkpoint's
``quant_model_description.json`` uses. The first section mirrors the upstream vllm-ascend tables
(``modelslim-format.md`` §7); the second adds the dense families vLLM serves most.
"""

QKV = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
GATE_UP = {"gate_up_proj": ("gate_proj", "up_proj")}
EXPERTS = {"experts": ("experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj")}
EXPERTS_W123 = {"experts": ("experts.0.w1", "experts.0.w2", "experts.0.w3")}
FUSED_QKV_A = {"fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}
QWEN3_5_LINEAR_ATTN = {
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}
OMNI_ATTN_QKV = {"attn_qkv_proj": ("attn_q_proj", "attn_k_proj", "attn_v_proj")}


def _union(*tables: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    merged: dict[str, tuple[str, ...]] = {}
    for table in tables:
        merged.update(table)
    return merged


PACKED_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    # --- upstream vllm-ascend `packed_modules_model_mapping` ---
    "minimax_m3": _union(QKV, GATE_UP, EXPERTS_W123),
    "minimax_m3_vl": _union(QKV, GATE_UP, EXPERTS_W123),
    "qwen3_moe": _union(QKV, GATE_UP, EXPERTS),
    "qwen3_5": _union(QKV, GATE_UP, QWEN3_5_LINEAR_ATTN),
    "qwen3_5_moe": _union(QKV, GATE_UP, QWEN3_5_LINEAR_ATTN, EXPERTS),
    "deepseek_v2": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "deepseek_v3": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "deepseek_v32": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "pangu_ultra_moe": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "pangu_ultra_moe_mtp": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "kimi_k2": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "glm_moe_dsa": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "glm4_moe_lite": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "longcat_flash": _union(GATE_UP, EXPERTS, FUSED_QKV_A),
    "deepseek_v4": _union(GATE_UP, EXPERTS),
    # The MTP layer is not quantized and ModelSlim omits it from the description: add its keys as "FLOAT".
    "deepseek_mtp": _union(GATE_UP, EXPERTS),
    "qwen3_next": _union(QKV, GATE_UP, {"in_proj": ("in_proj_qkvz", "in_proj_ba")}, EXPERTS),
    "qwen2_5_vl": _union(QKV, GATE_UP),
    "qwen3_vl_moe": _union(QKV, GATE_UP, EXPERTS),
    "glm4_moe": _union(QKV, GATE_UP, EXPERTS),
    "glm4v_moe": _union(QKV, GATE_UP, EXPERTS),
    "glm4v_moe_text": _union(QKV, GATE_UP, EXPERTS),
    "gemma4": _union(QKV, GATE_UP, EXPERTS),
    "gemma4_text": _union(QKV, GATE_UP, EXPERTS),
    "step3p5": _union(QKV, GATE_UP, EXPERTS),
    "step3p5_mtp": _union(QKV, GATE_UP, EXPERTS),
    "minimax_m2": _union(QKV, EXPERTS_W123),
    "qwen3_omni_moe": _union(QKV, OMNI_ATTN_QKV, GATE_UP, EXPERTS),
    "qwen2_5_omni": _union(QKV, OMNI_ATTN_QKV, {"qkv": ("q", "k", "v")}, GATE_UP),
    "bailing_hybrid": _union(GATE_UP, EXPERTS, FUSED_QKV_A, {"o_proj": ("dense",)}),
    # --- dense and MoE families whose vLLM model class supplies the same fusion ---
    "llama": _union(QKV, GATE_UP),
    "mistral": _union(QKV, GATE_UP),
    "qwen2": _union(QKV, GATE_UP),
    "qwen3": _union(QKV, GATE_UP),
    "qwen2_moe": _union(QKV, GATE_UP, EXPERTS),
    "qwen2_vl": _union(QKV, GATE_UP),
    "qwen3_vl": _union(QKV, GATE_UP),
    "gemma": _union(QKV, GATE_UP),
    "gemma2": _union(QKV, GATE_UP),
    "gemma3": _union(QKV, GATE_UP),
    "gemma3_text": _union(QKV, GATE_UP),
    "granite": _union(QKV, GATE_UP),
    "minicpm": _union(QKV, GATE_UP),
    "olmo2": _union(QKV, GATE_UP),
    "ernie4_5": _union(QKV, GATE_UP),
    "ernie4_5_moe": _union(QKV, GATE_UP, EXPERTS),
    "deepseek": _union(QKV, GATE_UP, EXPERTS),
    "mixtral": _union(QKV, EXPERTS_W123),
    "starcoder2": QKV,
    "phi": QKV,
    # Checkpoints of these already store `mlp.gate_up_proj` fused; only attention is split.
    "glm": QKV,
    "glm4": QKV,
    # Phi-3 stores `qkv_proj` and `gate_up_proj` fused in the checkpoint: nothing to resolve through shards.
    "phi3": {},
}

# Shards a fused module may lack: Gemma 4's `k_eq_v` attention has no `v_proj` when `q_proj` and `k_proj` exist.
OPTIONAL_SHARDS: dict[str, dict[str, tuple[str, ...]]] = {
    "gemma4": {"qkv_proj": ("v_proj",)},
    "gemma4_text": {"qkv_proj": ("v_proj",)},
}

PREFIX_REMAPS: dict[str, dict[str, str]] = {
    "deepseek_v4": {"layers.": "model.layers.", "embed.": "model.embed_tokens.", "head.": "lm_head."},
}

SUBSTRING_REMAPS: dict[str, dict[str, str]] = {
    "deepseek_v4": {
        ".attn.": ".self_attn.",
        ".w1.": ".gate_proj.",
        ".w2.": ".down_proj.",
        ".w3.": ".up_proj.",
        ".ffn.": ".mlp.",
        ".ffn_norm.": ".post_attention_layernorm.",
        ".attn_norm.": ".input_layernorm.",
    },
    "step3p5_mtp": {".mtp_block.": "."},
    "gemma4": {".moe.experts": ".experts"},
    "gemma4_text": {".moe.experts": ".experts"},
}
