"""Builders for tiny ModelSlim-style descriptions and checkpoint directories (no tensor library needed)."""

import json
import struct
from pathlib import Path

DTYPE_BYTES = {"I8": 1, "U8": 1, "I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file holding zero-filled tensors ``{name: (dtype, shape)}``."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def qwen3_linear_names(layers: int = 2) -> list[str]:
    names = []
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def float_entries(layers: int = 2) -> dict[str, str]:
    entries = {"model.embed_tokens.weight": "FLOAT", "model.norm.weight": "FLOAT", "lm_head.weight": "FLOAT"}
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            entries[f"model.layers.{i}.{norm}.weight"] = "FLOAT"
    return entries


# Tensor suffixes per linear, as msModelSlim 26.1.0 writes them (modelslim-tool.md §4.4).
V1_SUFFIXES = {
    "W8A8": ("weight", "quant_bias", "input_scale", "input_offset", "deq_scale"),
    "W8A8_DYNAMIC": ("weight", "weight_scale", "weight_offset"),
    "W4A8_DYNAMIC": ("weight", "weight_scale", "weight_offset", "scale_bias"),
}
V0_SUFFIXES = {
    "W8A8": ("weight", "quant_bias", "input_scale", "input_offset", "deq_scale", "weight_scale", "weight_offset"),
    "W4A16": ("weight", "weight_scale", "weight_offset"),
    "W4A8_DYNAMIC": (
        "weight",
        "weight_scale",
        "weight_offset",
        "scale_bias",
        "weight_scale_second",
        "weight_offset_second",
    ),
}


def modelslim_description(quant_type: str, *, v0: bool = False, layers: int = 2) -> dict:
    """A description shaped like msModelSlim's output for a tiny dense Qwen3 quantized with one type."""
    suffixes = (V0_SUFFIXES if v0 else V1_SUFFIXES)[quant_type]
    desc: dict = float_entries(layers)
    for linear in qwen3_linear_names(layers):
        desc.update({f"{linear}.{s}": quant_type for s in suffixes})
    if v0:
        desc.update({"version": "1.0.0", "model_quant_type": quant_type})
        if quant_type in ("W4A16", "W4A8_DYNAMIC"):
            desc["group_size"] = 64
    else:
        # v1 hides W4A8_DYNAMIC from model_quant_type: an all-W4A8 model says FLOAT.
        top = "FLOAT" if quant_type == "W4A8_DYNAMIC" else quant_type
        desc.update({"version": "1.0.0", "model_quant_type": top, "metadata": {}, "group_size": 0, "optional": {}})
    return desc


def write_checkpoint(path: Path, desc: dict, *, index: bool = True, shard: str = "quant_model_weights") -> Path:
    """A checkpoint directory: description, one shard (all tensors I8 [2, 2]) and optionally its index."""
    path.mkdir(parents=True, exist_ok=True)
    names = [k for k, v in desc.items() if "." in k and isinstance(v, str)]
    shard_name = f"{shard}-00001-of-00001.safetensors"
    write_safetensors(path / shard_name, {n: ("I8", [2, 2]) for n in names})
    if index:
        idx = {"metadata": {"total_size": 4 * len(names)}, "weight_map": dict.fromkeys(names, shard_name)}
        (path / f"{shard}.safetensors.index.json").write_text(json.dumps(idx))
    (path / "quant_model_description.json").write_text(json.dumps(desc))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return path
