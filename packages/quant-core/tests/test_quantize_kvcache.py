"""C8 KV-cache scales: layout as msModelSlim writes it, and scales that hold every calibration key / value."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from quant_core import QuantDescription  # noqa: E402
from quant_core.errors import QuantCoreError  # noqa: E402
from quant_core.quantize import quantize_model  # noqa: E402
from quant_core.runtime import load_quantized  # noqa: E402
from quant_core.tiny_models import make_tiny_model  # noqa: E402

TEXTS = [
    "The capital of France is Paris, and the Seine flows through it.",
    "def add(a, b):  return a + b  # small code sample",
    "Numbers 3.14159 and 2.71828 appear in many formulas, ÄÖÜ too.",
]
SEQ_LEN = 48
KV_CHANNELS = 64  # 2 KV heads x head_dim 32 in both tiny models


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"inputs_pretokenized": t}) + "\n" for t in TEXTS))
    return path


def cached_states(model: Path) -> dict[str, torch.Tensor]:
    """Every layer's keys as transformers caches them (after Qwen3's k_norm and RoPE) and values as v_proj outputs
    (a separate path: a forward hook), ``[tokens, kv_heads * head_dim]``."""
    tok = transformers.AutoTokenizer.from_pretrained(model)
    net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    seen: dict[str, list[torch.Tensor]] = {}
    for i in range(2):
        name = f"model.layers.{i}.self_attn.v_proj"
        net.get_submodule(name).register_forward_hook(lambda _m, _a, out, n=name: seen.setdefault(n, []).append(out[0]))
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=SEQ_LEN).input_ids
            cache = net(input_ids=ids, use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                keys = layer.keys[0].transpose(0, 1).reshape(ids.shape[1], -1)  # [heads, T, d] -> [T, heads * d]
                seen.setdefault(f"model.layers.{i}.self_attn.k_proj", []).append(keys)
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])  # Qwen3: k_norm before the cache; Qwen2: k/v biases
def test_c8_scales(kind, calib, tmp_path):
    model = make_tiny_model(kind, tmp_path / kind)
    out = tmp_path / "out"
    summary = quantize_model(model, out, "W8A8_DYNAMIC", calib=calib, calib_seq_len=SEQ_LEN, kv_cache="c8",
                             progress=False)  # fmt: skip
    assert "C8 KV-cache scales written" in str(summary)
    desc = QuantDescription.from_checkpoint(out)
    raw = json.loads((out / "quant_model_description.json").read_text())
    assert raw["kv_cache_type"] == raw["kv_quant_type"] == "C8" and desc.enable_c8_quant
    assert desc.c8_layer_ids == frozenset({0, 1})
    assert desc.model_quant_type == "W8A8_DYNAMIC"
    c8 = {k for k, v in desc.entries.items() if v == "C8"}
    assert c8 == {f"model.layers.{i}.self_attn.{p}_proj.kv_cache_{s}" for i in range(2) for p in "kv"
                  for s in ("scale", "offset")}  # fmt: skip
    assert desc.entries["model.layers.0.self_attn.k_proj.weight"] == "W8A8_DYNAMIC"  # the linear keeps its type
    tensors = load_file(next(out.glob("*.safetensors")))
    for name, states in cached_states(model).items():
        scale, offset = tensors[f"{name}.kv_cache_scale"], tensors[f"{name}.kv_cache_offset"]
        assert scale.dtype == offset.dtype == torch.float32 and scale.shape == offset.shape == (KV_CHANNELS,)
        # symmetric int8 per channel, as msModelSlim writes C8 (its offsets are all zero): amax / 127
        assert torch.equal(offset, torch.zeros_like(offset))
        assert torch.allclose(scale, states.abs().amax(0) / 127, rtol=1e-5), name
        q = torch.clamp(torch.round(states / scale + offset), -128, 127)
        err = ((q - offset) * scale - states).abs()
        # every calibration value lies within the grid's range, so the error is rounding only: half a step
        assert (err <= scale / 2 * (1 + 1e-4) + 1e-7).all(), (name, (err / scale).max().item())
    # the runtime does not use C8 tensors yet but must load the checkpoint with them
    net = load_quantized(out, dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(out)(TEXTS[0], return_tensors="pt").input_ids
    assert torch.isfinite(net(ids).logits).all()


def test_c8_keys_are_post_norm(calib, tmp_path):
    """Qwen3's k_norm rescales every head to unit rms (times the norm weight), so the cached keys' ranges differ
    from the raw k_proj output's: the written scales must follow the cache, not the projection."""
    model = make_tiny_model("qwen3", tmp_path / "qwen3")
    quantize_model(model, tmp_path / "out", "W8A16", calib=calib, calib_seq_len=SEQ_LEN, kv_cache="C8", progress=False)
    tensors = load_file(next((tmp_path / "out").glob("*.safetensors")))
    tok = transformers.AutoTokenizer.from_pretrained(model)
    net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    raw = []
    net.model.layers[0].self_attn.k_proj.register_forward_hook(lambda _m, _a, out: raw.append(out[0]))
    with torch.no_grad():
        for text in TEXTS:
            net(input_ids=tok(text, return_tensors="pt", truncation=True, max_length=SEQ_LEN).input_ids)
    raw = torch.cat(raw)
    raw_scale = raw.abs().amax(0) / 127
    written = tensors["model.layers.0.self_attn.k_proj.kv_cache_scale"]
    assert not torch.allclose(written, raw_scale, rtol=0.05)


def test_c8_errors(calib, tmp_path):
    model = make_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(QuantCoreError, match="--kv-cache C8: that needs calibration text"):
        quantize_model(model, tmp_path / "out", "W8A8_DYNAMIC", kv_cache="C8", progress=False)
    with pytest.raises(QuantCoreError, match="kv_cache must be 'C8'"):
        quantize_model(model, tmp_path / "out", "W8A8_DYNAMIC", calib=calib, kv_cache="FP8", progress=False)
    assert not (tmp_path / "out").exists()
