"""A description that does not match the model stops while vLLM builds or loads it, with quant-core's error naming the
layer or tensor and the fix (never a bare KeyError or a vLLM assertion)."""

import json

import pytest
import torch
from conftest import random_orthogonal, start_engine

import model_mappings
from quant_core import (
    CheckpointTensorError,
    DescriptionError,
    DescriptionNotFoundError,
    LayerLookupError,
    MixedShardsError,
    UnsupportedSchemeError,
)


def retype(match: str, quant_type: str):
    """An edit giving every description entry containing ``match`` the type ``quant_type``."""

    def edit(tensors: dict, desc: dict) -> None:
        desc.update({k: quant_type for k in desc if match in k})

    return edit


def rename(old: str, new: str):
    def edit(tensors: dict, desc: dict) -> None:
        for d in (tensors, desc):
            for k in [k for k in d if old in k]:
                d[k.replace(old, new)] = d.pop(k)

    return edit


def test_float_model_with_quantization_ascend_says_what_to_do(checkpoints):
    # vLLM wraps our DescriptionNotFoundError (a ValueError) in its config validation error; the message survives.
    with pytest.raises(ValueError, match=r"(?s)no quant_model_description\.json.*drop `--quantization ascend`"):
        start_engine(checkpoints.float_model("llama"))
    assert issubclass(DescriptionNotFoundError, ValueError)


def test_description_for_another_model_names_the_layer(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")

    def other_model(tensors: dict, desc: dict) -> None:
        for k in [k for k in desc if "layers.1." in k]:
            desc[k.replace("layers.1.", "layers.7.")] = desc.pop(k)

    with pytest.raises(LayerLookupError, match=r"(?s)model\.layers\.1\.self_attn\.qkv_proj.*Likely fix"):
        start_engine(checkpoints.edited(base, "qwen3-desc-other-model", other_model))


def test_missing_shard_names_the_fused_layer(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")
    model_dir = checkpoints.edited(base, "qwen3-query-proj", rename(".q_proj.", ".query_proj."))
    with pytest.raises(LayerLookupError, match=r"(?s)qkv_proj.*not q_proj.*packed-module table"):
        start_engine(model_dir)


def test_wrong_packed_module_table(checkpoints, monkeypatch):
    table = {"qkv_proj": ("q_proj", "k_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    monkeypatch.setattr(model_mappings, "packed_modules", lambda model_type: dict(table))
    with pytest.raises(DescriptionError, match=r"(?s)qkv_proj.*2 checkpoint shard.*vLLM builds it from 3"):
        start_engine(checkpoints.quantized("qwen3", "W8A8_DYNAMIC"))


def test_fused_shards_with_different_types(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")  # W8A16 stores the same tensors: only the lookup objects
    with pytest.raises(MixedShardsError, match=r"(?s)layers\.0\.self_attn\.qkv_proj.*k_proj=W8A16.*one scheme"):
        start_engine(checkpoints.edited(base, "qwen3-mixed-shards", retype("layers.0.self_attn.k_proj", "W8A16")))


def test_unsupported_scheme_for_the_layer_kind_names_the_layer(checkpoints):
    base = checkpoints.quantized("qwen3_moe", "W8A8_DYNAMIC")
    model_dir = checkpoints.edited(base, "qwen3_moe-experts-mix", retype("mlp.experts.", "W8A8_MIX"))
    with pytest.raises(UnsupportedSchemeError, match=r"(?s)moe layer 'model\.layers\.0\.mlp\.experts' is W8A8_MIX"):
        start_engine(model_dir)


def test_unknown_quant_type_names_the_layer(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")
    model_dir = checkpoints.edited(base, "qwen3-typo", retype("layers.1.mlp.down_proj", "W8A8_DYNAMC"))
    with pytest.raises(UnsupportedSchemeError, match=r"(?s)layers\.1\.mlp\.down_proj' is W8A8_DYNAMC.*W8A8_DYNAMIC"):
        start_engine(model_dir)


def test_quant_type_that_does_not_fit_the_stored_tensors(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")
    model_dir = checkpoints.edited(base, "qwen3-down-w4a16", retype("layers.0.mlp.down_proj", "W4A16"))
    with pytest.raises(CheckpointTensorError, match=r"layers\.0\.mlp\.down_proj\.weight' has shape \(128, 256\)"):
        start_engine(model_dir)


def test_fused_shards_with_different_flatquant_transforms(checkpoints):
    base = checkpoints.quantized("qwen3", "W8A8_FLATQUANT_DYNAMIC")

    def other_transform(tensors: dict, desc: dict) -> None:
        name = "model.layers.0.self_attn.k_proj.left_trans"
        tensors[name] = random_orthogonal(tensors[name].shape[0], seed=99) @ tensors[name]

    model_dir = checkpoints.edited(base, "qwen3-fq-k-transform", other_transform)
    assert not torch.equal(*_left_trans(model_dir))  # the q/v shards keep the original
    with pytest.raises(CheckpointTensorError, match=r"(?s)layers\.0\.self_attn\.qkv_proj\.left_trans.*fused shards"):
        start_engine(model_dir)


def test_w4a4_flatquant_fused_shards_with_different_clip_ratios(checkpoints):
    # int4 activations scale their range by clip_ratio: q/k/v with different ratios cannot share one quantized input
    base = checkpoints.quantized("qwen3", "W4A4_FLATQUANT_DYNAMIC")

    def other_clip(tensors: dict, desc: dict) -> None:
        tensors["model.layers.0.self_attn.k_proj.clip_ratio"] = torch.tensor([0.5])

    model_dir = checkpoints.edited(base, "qwen3-fq4-k-clip", other_clip)
    with pytest.raises(CheckpointTensorError, match=r"(?s)layers\.0\.self_attn\.qkv_proj\.clip_ratio.*fused shards"):
        start_engine(model_dir)


def _left_trans(model_dir):
    from safetensors.torch import load_file

    index = json.loads((model_dir / "quant_model_weights.safetensors.index.json").read_text())["weight_map"]
    shard = load_file(model_dir / index["model.layers.0.self_attn.q_proj.left_trans"])
    return shard["model.layers.0.self_attn.q_proj.left_trans"], shard["model.layers.0.self_attn.k_proj.left_trans"]


def test_expert_parallelism_is_refused_naming_the_layer(checkpoints, capfd, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # two ranks on one NUMA node
    model_dir = checkpoints.quantized("qwen3_moe", "W8A8_DYNAMIC")
    # The error is raised in the worker processes; vLLM reports their failure and logs the cause.
    with pytest.raises(Exception, match="WorkerProc initialization failed"):
        start_engine(model_dir, tensor_parallel_size=2, enable_expert_parallel=True, distributed_executor_backend="mp")
    logged = "".join(capfd.readouterr())
    assert "UnsupportedSchemeError: MoE layer 'model.layers.0.mlp.experts': expert parallelism" in logged
