import pytest
from builders import float_entries, modelslim_description

from quant_core import LayerLookupError, MixedShardsError, QuantDescription, quant_type_for

QKV_GU = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
EXPERTS = {"experts": ["experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"]}


def qwen3_moe_mixed() -> QuantDescription:
    """Like msModelSlim's mixed Qwen3-MoE output: W8A8_DYNAMIC attention, W4A8_DYNAMIC experts, FLOAT routers."""
    raw = float_entries(2)
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for s in ("weight", "weight_scale", "weight_offset"):
                raw[f"model.layers.{i}.self_attn.{p}.{s}"] = "W8A8_DYNAMIC"
        raw[f"model.layers.{i}.mlp.gate.weight"] = "FLOAT"
        for e in range(4):
            for p in ("gate_proj", "up_proj", "down_proj"):
                for s in ("weight", "weight_scale", "weight_offset", "scale_bias"):
                    raw[f"model.layers.{i}.mlp.experts.{e}.{p}.{s}"] = "W4A8_DYNAMIC"
    raw.update({"version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "group_size": 0})
    return QuantDescription.from_dict(raw)


@pytest.mark.parametrize("quant_type", ["W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"])
def test_dense_v1_layers_resolve_plain_and_fused(quant_type):
    desc = QuantDescription.from_dict(modelslim_description(quant_type))
    for i in range(2):
        for prefix in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert desc.quant_type_for(f"model.layers.{i}.{prefix}", "linear", QKV_GU) == quant_type
        assert desc.quant_type_for(f"model.layers.{i}.self_attn.q_proj", "linear") == quant_type
    assert desc.quant_type_for("lm_head", "linear", QKV_GU) is None
    assert desc.quant_type_for("model.embed_tokens", "linear", QKV_GU) is None


@pytest.mark.parametrize("quant_type", ["W8A8", "W4A16", "W4A8_DYNAMIC"])
def test_dense_v0_layers_resolve(quant_type):
    desc = QuantDescription.from_dict(modelslim_description(quant_type, v0=True))
    assert desc.quant_type_for("model.layers.1.self_attn.qkv_proj", "linear", QKV_GU) == quant_type


def test_module_level_function_matches_the_method():
    desc = QuantDescription.from_dict(modelslim_description("W8A8"))
    assert quant_type_for(desc, "model.layers.0.mlp.gate_up_proj", "linear", QKV_GU) == "W8A8"


def test_dispatch_ignores_model_quant_type():
    desc = qwen3_moe_mixed()
    assert desc.model_quant_type == "W8A8_DYNAMIC"
    assert desc.quant_type_for("model.layers.0.mlp.experts", "moe", QKV_GU | EXPERTS) == "W4A8_DYNAMIC"
    assert desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", QKV_GU | EXPERTS) == "W8A8_DYNAMIC"
    # The router is FLOAT; `mlp.gate` must not be confused with `mlp.gate_proj`-style names.
    assert desc.quant_type_for("model.layers.0.mlp.gate", "linear", QKV_GU | EXPERTS) is None


def test_moe_without_an_experts_table_entry_resolves_through_expert_zero():
    desc = qwen3_moe_mixed()
    assert desc.quant_type_for("model.layers.1.mlp.experts", "moe", QKV_GU) == "W4A8_DYNAMIC"
    assert desc.quant_type_for("model.layers.1.mlp.experts", "moe") == "W4A8_DYNAMIC"


def test_moe_experts_disagreeing_within_expert_zero():
    raw = {
        "model.layers.0.mlp.experts.0.gate_proj.weight": "W4A8_DYNAMIC",
        "model.layers.0.mlp.experts.0.up_proj.weight": "W4A8_DYNAMIC",
        "model.layers.0.mlp.experts.0.down_proj.weight": "W8A8_DYNAMIC",
    }
    with pytest.raises(MixedShardsError, match="do not share one quant type") as info:
        QuantDescription.from_dict(raw).quant_type_for("model.layers.0.mlp.experts", "moe", EXPERTS)
    assert "experts.0.down_proj=W8A8_DYNAMIC" in str(info.value)


def test_all_float_fused_layer_is_unquantized():
    raw = modelslim_description("W8A8_DYNAMIC")
    for p in ("q_proj", "k_proj", "v_proj"):
        raw[f"model.layers.0.self_attn.{p}.weight"] = "FLOAT"
    desc = QuantDescription.from_dict(raw)
    assert desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", QKV_GU) is None


def test_fused_shards_half_float_is_an_error():
    raw = modelslim_description("W8A8_DYNAMIC")
    raw["model.layers.1.self_attn.v_proj.weight"] = "FLOAT"
    desc = QuantDescription.from_dict(raw)
    with pytest.raises(MixedShardsError) as info:
        desc.quant_type_for("model.layers.1.self_attn.qkv_proj", "linear", QKV_GU)
    message = str(info.value)
    assert "'model.layers.1.self_attn.qkv_proj'" in message
    assert "some but not all of its shards are quantized" in message
    assert "v_proj=FLOAT" in message and "q_proj=W8A8_DYNAMIC" in message
    assert isinstance(info.value, ValueError)


def test_fused_shards_with_different_types_is_an_error():
    raw = modelslim_description("W8A8_DYNAMIC")
    raw["model.layers.0.mlp.up_proj.weight"] = "W8A16"
    with pytest.raises(MixedShardsError, match=r"do not share one quant type.*up_proj=W8A16"):
        QuantDescription.from_dict(raw).quant_type_for("model.layers.0.mlp.gate_up_proj", "linear", QKV_GU)


def test_missing_layer_error_names_layer_keys_closest_and_fix():
    desc = QuantDescription.from_dict(modelslim_description("W8A8_DYNAMIC"))
    with pytest.raises(LayerLookupError) as info:
        desc.quant_type_for("model.layers.9.mlp.down_proj", "linear", QKV_GU)
    message = str(info.value)
    assert "No entry for linear layer 'model.layers.9.mlp.down_proj'" in message
    assert "Looked for: model.layers.9.mlp.down_proj.weight" in message
    assert "Closest keys that exist: model.layers.1.mlp.down_proj.weight" in message
    assert "belongs to this checkpoint" in message and '"FLOAT"' in message and "--quantization ascend" in message
    assert isinstance(info.value, LookupError) and not isinstance(info.value, KeyError)


def test_missing_key_from_a_prefix_mismatch_suggests_the_mapper():
    desc = QuantDescription.from_dict(modelslim_description("W8A8_DYNAMIC"))
    with pytest.raises(LayerLookupError, match="the prefixes differ") as info:
        desc.quant_type_for("language_model.model.layers.0.self_attn.qkv_proj", "linear", QKV_GU)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in str(info.value)
    assert "'model.layers.0.self_attn.q_proj.weight'" in str(info.value)


def test_missing_packed_table_names_the_shards_it_found():
    desc = QuantDescription.from_dict(modelslim_description("W8A8_DYNAMIC"))
    with pytest.raises(LayerLookupError) as info:
        desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", {})
    message = str(info.value)
    assert "'qkv_proj' looks like a fused module with no packed-module table entry" in message
    assert "lists model.layers.0.self_attn.{q_proj, k_proj, v_proj}" in message
    assert "{'qkv_proj': ['q_proj', 'k_proj', 'v_proj']}" in message
    assert "model_mappings.packed_modules" in message


def test_missing_shard_with_a_mapping_names_present_and_missing_shards():
    raw = modelslim_description("W8A8_DYNAMIC")
    del raw["model.layers.0.self_attn.v_proj.weight"]
    desc = QuantDescription.from_dict(raw)
    with pytest.raises(LayerLookupError) as info:
        desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", QKV_GU)
    message = str(info.value)
    assert "Looked for: model.layers.0.self_attn.v_proj.weight" in message
    assert "has q_proj, k_proj but not v_proj" in message and "optional_shards" in message


def test_optional_shard_may_be_missing_but_not_all_shards():
    raw = modelslim_description("W8A8_DYNAMIC")
    del raw["model.layers.0.self_attn.v_proj.weight"]
    desc = QuantDescription.from_dict(raw)
    optional = {"qkv_proj": ["v_proj"]}
    assert (
        desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", QKV_GU, optional_shards=optional)
        == "W8A8_DYNAMIC"
    )
    with pytest.raises(LayerLookupError):
        desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", {"qkv_proj": ["v_proj"]},
                            optional_shards=optional)  # fmt: skip


def test_missing_gate_up_table_guesses_its_shards():
    desc = QuantDescription.from_dict(modelslim_description("W8A8_DYNAMIC"))
    with pytest.raises(LayerLookupError, match=r"\{'gate_up_proj': \['gate_proj', 'up_proj'\]\}"):
        desc.quant_type_for("model.layers.1.mlp.gate_up_proj", "linear", {"qkv_proj": ["q_proj"]})


def test_lm_head_falls_back_to_language_model_prefix():
    desc = QuantDescription.from_dict({"language_model.lm_head.weight": "W8A8_DYNAMIC"})
    assert desc.quant_type_for("lm_head", "linear") == "W8A8_DYNAMIC"


def test_plain_layer_is_skipped_when_a_nested_weight_is_float():
    desc = QuantDescription.from_dict({"model.layers.0.mlp.shared_expert_gate.linear.weight": "FLOAT"})
    assert desc.quant_type_for("model.layers.0.mlp.shared_expert_gate", "linear") is None


def test_unknown_layer_kind():
    desc = QuantDescription.from_dict({})
    with pytest.raises(ValueError, match="layer_kind must be one of linear, moe, attention"):
        desc.quant_type_for("model.layers.0.mlp", "mlp")


def test_attention_c8_fa_and_indexer():
    raw = modelslim_description("W8A8_DYNAMIC")
    raw.update({"kv_cache_type": "C8"})
    raw["model.layers.1.self_attn.k_proj.kv_cache_scale"] = "C8"
    desc = QuantDescription.from_dict(raw)
    assert desc.quant_type_for("model.layers.1.self_attn.attn", "attention") == "C8"
    assert desc.quant_type_for("model.layers.0.self_attn.attn", "attention") is None
    assert desc.quant_type_for("lm_head", "attention") is None

    mla = QuantDescription.from_dict(
        {
            "fa_quant_type": "FAKQuant",
            "model.layers.3.self_attn.fa_k.scale": "FAKQuant",
            "indexer_quant_type": "INT8_DYNAMIC",
            "model.layers.4.self_attn.indexer.quant_type": "INT8_DYNAMIC",
        }
    )
    assert mla.quant_type_for("model.layers.3.self_attn", "attention") == "FAKQuant"
    assert mla.quant_type_for("model.layers.4.self_attn", "attention") == "INT8_DYNAMIC"
    assert mla.quant_type_for("model.layers.5.self_attn", "attention") is None


def test_c8_keys_without_the_global_flag_do_not_enable_c8():
    raw = {"model.layers.1.self_attn.k_proj.kv_cache_scale": "C8"}
    assert QuantDescription.from_dict(raw).quant_type_for("model.layers.1.self_attn.attn", "attention") is None


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "qwen2", "llama", "glm4"])
def test_real_tables_from_model_mappings(model_type):
    model_mappings = pytest.importorskip("model_mappings")
    table = model_mappings.packed_modules(model_type)
    desc = qwen3_moe_mixed()
    if "qkv_proj" in table:
        assert desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", table) == "W8A8_DYNAMIC"
    assert desc.quant_type_for("model.layers.0.self_attn.o_proj", "linear", table) == "W8A8_DYNAMIC"
    assert desc.quant_type_for("model.layers.1.mlp.experts", "moe", table) == "W4A8_DYNAMIC"
