import re
import subprocess
import sys

import pytest

import model_mappings
from model_mappings import known_model_types, optional_shards, packed_modules, remap_prefix
from model_mappings._tables import OPTIONAL_SHARDS, PACKED_MODULES, PREFIX_REMAPS, SUBSTRING_REMAPS

UPSTREAM_MODEL_TYPES = [
    "minimax_m3",
    "minimax_m3_vl",
    "qwen3_moe",
    "qwen3_5",
    "qwen3_5_moe",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "pangu_ultra_moe",
    "pangu_ultra_moe_mtp",
    "kimi_k2",
    "glm_moe_dsa",
    "glm4_moe_lite",
    "longcat_flash",
    "deepseek_v4",
    "deepseek_mtp",
    "qwen3_next",
    "qwen2_5_vl",
    "qwen3_vl_moe",
    "glm4_moe",
    "glm4v_moe",
    "glm4v_moe_text",
    "gemma4",
    "gemma4_text",
    "step3p5",
    "step3p5_mtp",
    "minimax_m2",
    "qwen3_omni_moe",
    "qwen2_5_omni",
    "bailing_hybrid",
]
DENSE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite", "glm4"]
MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def test_every_upstream_and_common_dense_model_type_has_a_table():
    missing = [t for t in UPSTREAM_MODEL_TYPES + DENSE_FAMILIES if t not in PACKED_MODULES]
    assert not missing
    assert known_model_types() == sorted(PACKED_MODULES)


@pytest.mark.parametrize("model_type", sorted(PACKED_MODULES))
def test_packed_table_is_well_formed(model_type):
    table = PACKED_MODULES[model_type]
    assert isinstance(table, dict)
    for fused, shards in table.items():
        assert MODULE_PATH.match(fused), fused
        assert "." not in fused, "a fused name is the last component of a vLLM prefix"
        assert isinstance(shards, tuple), f"{model_type}.{fused}: shards must be an immutable tuple"
        assert shards, f"{model_type}.{fused} has no shards"
        assert len(set(shards)) == len(shards), f"{model_type}.{fused} repeats a shard"
        for shard in shards:
            assert MODULE_PATH.match(shard), shard
        if fused == "experts":
            # Expert 0 represents every expert; the shards are relative to the MoE block.
            assert all(s.startswith("experts.0.") for s in shards), shards
            assert len(shards) == 3
        else:
            assert all("." not in s for s in shards), shards


@pytest.mark.parametrize("model_type", sorted(OPTIONAL_SHARDS))
def test_optional_shards_name_real_shards(model_type):
    for fused, shards in OPTIONAL_SHARDS[model_type].items():
        assert set(shards) < set(PACKED_MODULES[model_type][fused])


@pytest.mark.parametrize("table", [PREFIX_REMAPS, SUBSTRING_REMAPS])
def test_remap_tables_are_well_formed(table):
    for model_type, remaps in table.items():
        assert model_type in PACKED_MODULES
        for old, new in remaps.items():
            assert isinstance(old, str) and isinstance(new, str)
            assert old and old != new


def test_packed_modules_returns_a_copy():
    table = packed_modules("qwen3_moe")
    table["qkv_proj"] = ("nonsense",)
    assert packed_modules("qwen3_moe")["qkv_proj"] == ("q_proj", "k_proj", "v_proj")


def test_packed_modules_distinguishes_unknown_from_empty():
    assert packed_modules("not_a_model_type") is None
    assert packed_modules("phi3") == {}


def test_upstream_examples():
    assert packed_modules("qwen3_moe")["experts"] == (
        "experts.0.gate_proj",
        "experts.0.up_proj",
        "experts.0.down_proj",
    )
    assert packed_modules("deepseek_v3")["fused_qkv_a_proj"] == ("q_a_proj", "kv_a_proj_with_mqa")
    assert packed_modules("qwen3_next")["in_proj"] == ("in_proj_qkvz", "in_proj_ba")
    assert packed_modules("bailing_hybrid")["o_proj"] == ("dense",)
    assert packed_modules("minimax_m2")["experts"] == ("experts.0.w1", "experts.0.w2", "experts.0.w3")
    assert "qkv_proj" not in packed_modules("deepseek_v3")
    assert optional_shards("gemma4") == {"qkv_proj": ("v_proj",)}
    assert optional_shards("llama") == {}


@pytest.mark.parametrize(
    ("model_type", "prefix", "expected"),
    [
        ("deepseek_v4", "layers.3.attn.wq_a", "model.layers.3.self_attn.wq_a"),
        ("deepseek_v4", "layers.3.ffn.experts.0.w1.weight", "model.layers.3.mlp.experts.0.gate_proj.weight"),
        ("deepseek_v4", "head", "head"),  # the prefix table matches "head." only, as upstream
        ("deepseek_v4", "head.weight", "lm_head.weight"),
        ("deepseek_v4", "embed.weight", "model.embed_tokens.weight"),
        ("step3p5_mtp", "model.layers.45.mtp_block.mlp.experts", "model.layers.45.mlp.experts"),
        ("gemma4", "model.layers.2.mlp.moe.experts", "model.layers.2.mlp.experts"),
        ("minimax_m2", "model.layers.0.mlp.experts.7.w1", "model.layers.0.block_sparse_moe.experts"),
        ("minimax_m2", "model.layers.0.mlp.experts", "model.layers.0.block_sparse_moe.experts"),
        ("minimax_m2", "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.qkv_proj"),
        ("bailing_hybrid", "model.layers.1.linear_attn.dense", "model.layers.1.attention.dense"),
        ("bailing_hybrid", "model.layers.1.self_attn.o_proj", "model.layers.1.attention.o_proj"),
        ("llama", "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.qkv_proj"),
        ("unknown", "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.gate_up_proj"),
    ],
)
def test_remap_prefix(model_type, prefix, expected):
    assert remap_prefix(model_type, prefix) == expected


def test_import_pulls_in_nothing_heavy():
    code = "import sys, model_mappings; print(sorted(m for m in ('torch', 'numpy', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert model_mappings.__all__ == sorted(model_mappings.__all__)
