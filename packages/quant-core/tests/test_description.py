import json

import pytest
from builders import modelslim_description, write_checkpoint

import quant_core
from quant_core import (
    DescriptionError,
    DescriptionNotFoundError,
    QuantDescription,
    is_modelslim_checkpoint,
    layer_id,
)
from quant_core import description as description_module


def test_globals_are_typed_and_separated_from_entries():
    desc = QuantDescription.from_dict(modelslim_description("W8A8_DYNAMIC"))
    assert desc.version == "1.0.0"
    assert desc.model_quant_type == "W8A8_DYNAMIC"
    assert desc.group_size == 0
    assert desc.metadata == {} and desc.optional == {}
    assert desc.extra == {}
    assert "version" not in desc.entries and "group_size" not in desc.entries
    assert desc.entries["model.layers.1.mlp.down_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert desc.quant_type_counts() == {"W8A8_DYNAMIC": 14, "FLOAT": 11}
    assert desc.is_quantized


def test_defaults_when_globals_are_absent():
    desc = QuantDescription.from_dict({"model.layers.0.mlp.down_proj.weight": "W8A16"})
    assert desc.version == "0"  # upstream's default
    assert desc.group_size == 0
    assert desc.model_quant_type is None
    assert desc.kv_cache_type is None and not desc.enable_c8_quant
    assert not desc.enable_fa_quant and not desc.enable_indexer_quant
    assert not desc.is_rot_used and not desc.hc_head_fn


def test_every_known_global_is_typed():
    desc = QuantDescription.from_dict(
        {
            "version": "1.0.0",
            "model_quant_type": "W4A4_MXFP4",
            "group_size": 32,
            "kv_cache_type": "C8",
            "kv_quant_type": "C8",
            "fa_quant_type": "FAKQuant",
            "indexer_quant_type": "INT8_DYNAMIC",
            "reduce_quant_type": "per_channel",
            "max_supported_tp": 8,
            "is_rot_used": True,
            "hc_head_fn": "anything: only its presence counts",
            "ascend_quant_method": "modelslim",
            "weight_strategy": "channel",
            "metadata": {"score": 1},
            "optional": {"quarot": {"rotation_map": {"global_rotation": "optional/rot.safetensors"}}},
        }
    )
    assert desc.group_size == 32 and desc.max_supported_tp == 8
    assert desc.is_rot_used is True and desc.hc_head_fn is True
    assert desc.enable_c8_quant and desc.enable_fa_quant and desc.enable_indexer_quant
    assert desc.optional["quarot"]["rotation_map"]["global_rotation"] == "optional/rot.safetensors"
    assert desc.entries == {}


def test_unknown_global_keys_are_kept_not_rejected():
    raw = modelslim_description("W8A8")
    raw.update({"producer": "msmodelslim", "calib_samples": 128, "future_flags": {"x": [1, 2]}})
    desc = QuantDescription.from_dict(raw)
    assert desc.extra == {"producer": "msmodelslim", "calib_samples": 128, "future_flags": {"x": [1, 2]}}


def test_integer_version_is_accepted_as_text():
    assert QuantDescription.from_dict({"version": 0}).version == "0"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("group_size", "64", "a non-negative integer"),
        ("group_size", -1, "a non-negative integer"),
        ("group_size", True, "a non-negative integer"),
        ("version", 1.5, "a version string"),
        ("model_quant_type", 8, "a string"),
        ("is_rot_used", "yes", "true or false"),
        ("metadata", [], "a JSON object"),
        ("kv_cache_type", None, "a string"),
    ],
)
def test_badly_typed_global_names_the_key(key, value, expected):
    with pytest.raises(DescriptionError, match=rf"global key '{key}' must be {expected}"):
        QuantDescription.from_dict({key: value})


@pytest.mark.parametrize("value", [8, None, ["W8A8"], {"type": "W8A8"}, ""])
def test_entry_value_that_is_not_a_quant_type_string_is_an_error(value):
    with pytest.raises(DescriptionError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' must be a quant-type"):
        QuantDescription.from_dict({"model.layers.0.mlp.down_proj.weight": value})


def test_tensor_names_decide_what_is_an_entry():
    names = {"model.layers.0.mlp.down_proj.weight", "bias_without_dots"}
    raw = {
        "model.layers.0.mlp.down_proj.weight": "W8A16",
        "bias_without_dots": "FLOAT",
        "some.dotted.global": {"not": "a tensor"},  # not in the checkpoint, not a string: a global
        "model.layers.0.self_attn.indexer.quant_type": "INT8_DYNAMIC",  # per-layer override, kept as entry
    }
    desc = QuantDescription.from_dict(raw, tensor_names=names)
    assert desc.entries["bias_without_dots"] == "FLOAT"
    assert desc.entries["model.layers.0.self_attn.indexer.quant_type"] == "INT8_DYNAMIC"
    assert desc.extra == {"some.dotted.global": {"not": "a tensor"}}
    with pytest.raises(DescriptionError, match="bias_without_dots"):
        QuantDescription.from_dict({"bias_without_dots": 3}, tensor_names=names)


def test_not_an_object():
    with pytest.raises(DescriptionError, match="must be a JSON object"):
        QuantDescription.from_dict(["model.layers.0.weight", "W8A8"])


def test_from_json_and_malformed_files(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps(modelslim_description("W8A8")))
    assert QuantDescription.from_json(good).model_quant_type == "W8A8"
    assert QuantDescription.load(good).source == str(good)

    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:-40])
    with pytest.raises(DescriptionError, match=r"truncated\.json: not valid JSON"):
        QuantDescription.from_json(truncated)

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DescriptionError, match="not valid JSON"):
        QuantDescription.from_json(binary)

    with pytest.raises(DescriptionNotFoundError, match="no such description file"):
        QuantDescription.from_json(tmp_path / "absent.json")


def test_duplicate_keys_with_different_values_are_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"a.weight": "W8A8", "a.weight": "FLOAT"}')
    with pytest.raises(DescriptionError, match=r"'a\.weight' appears twice"):
        QuantDescription.from_json(path)
    path.write_text('{"a.weight": "W8A8", "a.weight": "W8A8"}')
    assert QuantDescription.from_json(path).entries == {"a.weight": "W8A8"}


def test_oversized_and_deeply_nested_files_are_refused(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DescriptionError, match="nested too deeply"):
        QuantDescription.from_json(deep)
    monkeypatch.setattr(description_module, "MAX_DESCRIPTION_BYTES", 100)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(modelslim_description("W8A8")))
    with pytest.raises(DescriptionError, match="far larger than any real description"):
        QuantDescription.from_json(big)


def test_from_checkpoint_v1_with_index(tmp_path):
    ckpt = write_checkpoint(tmp_path / "v1", modelslim_description("W4A8_DYNAMIC"))
    assert is_modelslim_checkpoint(ckpt)
    desc = QuantDescription.from_checkpoint(ckpt)
    assert desc.model_quant_type == "FLOAT"  # the v1 quirk ...
    # ... so the lookup dispatches on the per-tensor entries, never on model_quant_type.
    assert desc.quant_type_for("model.layers.0.mlp.down_proj", "linear") == "W4A8_DYNAMIC"
    assert QuantDescription.load(ckpt) == desc


def test_from_checkpoint_v0_shard_names_without_index(tmp_path):
    raw = modelslim_description("W4A16", v0=True)
    ckpt = write_checkpoint(tmp_path / "v0", raw, index=False, shard="quant_model_weight_w4a16")
    desc = QuantDescription.from_checkpoint(ckpt)
    assert desc.group_size == 64
    assert desc.entries["model.layers.0.self_attn.q_proj.weight_offset"] == "W4A16"
    assert desc.metadata == {}  # v0 writes no metadata/optional


def test_checkpoint_tensor_names_classify_a_non_string_tensor_entry(tmp_path):
    raw = modelslim_description("W8A8_DYNAMIC")
    ckpt = write_checkpoint(tmp_path / "c", raw)
    raw["model.layers.0.mlp.up_proj.weight"] = 8
    (ckpt / "quant_model_description.json").write_text(json.dumps(raw))
    with pytest.raises(DescriptionError, match=r"up_proj\.weight' must be a quant-type string"):
        QuantDescription.from_checkpoint(ckpt)


def test_missing_description_lists_what_is_there(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not is_modelslim_checkpoint(tmp_path)
    with pytest.raises(DescriptionNotFoundError) as info:
        QuantDescription.from_checkpoint(tmp_path)
    message = str(info.value)
    assert "config.json, tokenizer.json" in message
    assert "drop `--quantization ascend`" in message and "quantize it first" in message
    assert isinstance(info.value, FileNotFoundError)
    assert not is_modelslim_checkpoint(tmp_path / "nowhere")


def test_a_single_differently_named_description_is_found(tmp_path):
    ckpt = write_checkpoint(tmp_path / "c", modelslim_description("W8A8_DYNAMIC"))
    (ckpt / "quant_model_description.json").rename(ckpt / "quant_model_description_w8a8_dynamic.json")
    assert is_modelslim_checkpoint(ckpt)
    assert QuantDescription.from_checkpoint(ckpt).model_quant_type == "W8A8_DYNAMIC"
    (ckpt / "quant_model_description_w8a8.json").write_text("{}")
    with pytest.raises(DescriptionNotFoundError, match="Several candidates"):
        QuantDescription.from_checkpoint(ckpt)


def test_load_time_aliases_are_added_without_replacing_keys():
    desc = QuantDescription.from_dict(
        {
            "model.layers.61.shared_head.head.weight": "FLOAT",
            "model.layers.3.mlp.experts.0.gate_proj.weight_packed": "W4A16",
            "model.layers.3.mlp.experts.0.gate_proj.weight": "W8A8_DYNAMIC",  # exists: not overwritten
            "model.layers.4.mlp.experts.0.up_proj.weight_packed": "W4A16",
            "model.layers.45.transformer.shared_head.output.weight": "FLOAT",
        }
    )
    assert desc.entries["model.layers.61.head.weight"] == "FLOAT"
    assert desc.entries["model.layers.3.mlp.experts.0.gate_proj.weight"] == "W8A8_DYNAMIC"
    assert desc.entries["model.layers.4.mlp.experts.0.up_proj.weight"] == "W4A16"
    assert desc.entries["model.layers.45.shared_head.head.weight"] == "FLOAT"


def test_deepseek_v4_raw_names_get_vllm_aliases():
    desc = QuantDescription.from_dict(
        {
            "hc_head_fn": True,
            "layers.0.attn.wq_a.weight": "W8A8_DYNAMIC",
            "layers.0.ffn.experts.0.w1.weight": "W4A8_DYNAMIC",
            "head.weight": "FLOAT",
            "embed.weight": "FLOAT",
        }
    )
    assert desc.entries["model.layers.0.self_attn.wq_a.weight"] == "W8A8_DYNAMIC"
    assert desc.entries["model.layers.0.mlp.experts.0.gate_proj.weight"] == "W4A8_DYNAMIC"
    assert desc.entries["lm_head.weight"] == "FLOAT"
    assert desc.entries["model.embed_tokens.weight"] == "FLOAT"
    assert desc.entries["layers.0.attn.wq_a.weight"] == "W8A8_DYNAMIC"  # originals stay


def test_with_renamed_keys_applies_a_mapper():
    desc = QuantDescription.from_dict(modelslim_description("W8A8_DYNAMIC"))
    mapped = desc.with_renamed_keys(
        lambda k: None if k.startswith("lm_head") else k.replace("model.", "language_model.model.", 1)
    )
    assert "lm_head.weight" not in mapped.entries
    assert mapped.quant_type_for("language_model.model.layers.1.mlp.up_proj", "linear") == "W8A8_DYNAMIC"
    assert mapped.version == desc.version and desc.entries["lm_head.weight"] == "FLOAT"


def test_kv_cache_metadata_is_derived_from_keys():
    raw = modelslim_description("W8A8_DYNAMIC")
    raw.update({"kv_cache_type": "C8", "kv_quant_type": "C8"})
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            for t in ("kv_cache_scale", "kv_cache_offset"):
                raw[f"model.layers.{i}.self_attn.{proj}.{t}"] = "C8"
    raw["model.layers.5.self_attn.fa_k.scale"] = "FAKQuant"
    raw["model.layers.7.self_attn.indexer.quant_type"] = "INT8_DYNAMIC"
    desc = QuantDescription.from_dict(raw)
    assert desc.enable_c8_quant and desc.c8_layer_ids == {0, 1}
    assert desc.fa_quant_layer_ids == {5}
    assert desc.indexer_quant_layer_ids == {7}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("model.layers.7.self_attn", 7), ("model.layers.12", 12), ("lm_head", None), ("model.norm.weight", None)],
)
def test_layer_id(name, expected):
    assert layer_id(name) == expected


def test_package_exports_exist():
    for name in quant_core.__all__:
        assert hasattr(quant_core, name), name
