"""Static calibration (W8A8 / W8A8_MIX): input_scale / input_offset follow the observed layer inputs."""

import json
import re
from pathlib import Path

import pytest
import torch
from linear_inputs import record_linear_inputs

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from quant_core import QuantDescription, get_scheme  # noqa: E402
from quant_core.errors import QuantCoreError  # noqa: E402
from quant_core.quantize import quantize_model  # noqa: E402
from quant_core.tiny_models import make_tiny_model  # noqa: E402

TEXTS = [
    "Question: There are 15 trees in the grove. Grove workers will plant trees today. How many did they plant?",
    "The capital of France is Paris, and the Seine flows through it.",
    "def add(a, b):  return a + b  # small code sample",
    "Numbers 3.14159 and 2.71828 appear in many formulas.",
    "A short one.",
    "Calibration should see a variety of tokens: ÄÖÜ, emoji-free punctuation!?",
]
SEQ_LEN = 32
QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("m") / "qwen2")  # Qwen2: q/k/v have biases


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def observed(model) -> dict[str, torch.Tensor]:
    """Every linear's inputs over the calibration texts, recorded here independently of the quantizer."""
    return record_linear_inputs(model, TEXTS, SEQ_LEN)


def quantize(model, out, calib, **options) -> dict[str, torch.Tensor]:
    options = {"calib_seq_len": SEQ_LEN, "progress": False, **options}
    quantize_model(model, out, options.pop("scheme", "W8A8"), calib=calib, **options)
    return load_file(next(out.glob("*.safetensors")))


def test_input_scale_is_the_observed_range(model, calib, observed, tmp_path):
    tensors = quantize(model, tmp_path / "out", calib)
    for name, x in observed.items():
        lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        scale, offset = tensors[f"{name}.input_scale"].item(), tensors[f"{name}.input_offset"].item()
        # asymmetric int8 over [lo, hi]: scale = (hi - lo) / 255, and lo maps to -128 (up to the offset's rounding)
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-5), name
        assert offset == round(offset) and abs(-128 - lo / scale - offset) <= 0.5 + 1e-4, name
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        scales = {tensors[f"{attn}.{p}.input_scale"].item() for p in QKV}
        assert len(scales) == 1  # q/k/v read one input: one range
        assert tensors[f"{attn}.o_proj.input_scale"].item() not in scales


def test_static_layers_reproduce_the_float_outputs(model, calib, observed, tmp_path):
    """On the calibration activations themselves (no clipping), the W8A8 layer output, with the Qwen2 q/k/v bias
    folded into quant_bias, is within a few % of x Wᵀ + b: int8 activations over the layer's full range
    (step (hi-lo)/255, rounding error step/√12) plus int8 weights (0.7 %) measure 1.0-2.8 % here (down_proj, with
    the widest input range relative to its rms, is worst)."""
    source = load_file(model / "model.safetensors")
    tensors = quantize(model, tmp_path / "out", calib)
    scheme = get_scheme("W8A8", "linear", backend="reference", version="1.0.0")
    for name in observed:
        layer = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name and
                 not k.endswith(".bias")}  # fmt: skip
        x = observed[name]
        bias = source.get(f"{name}.bias")
        ref = x.double() @ source[f"{name}.weight"].double().T + (0 if bias is None else bias.double())
        y = scheme.apply(scheme.process_weights(layer, layer=name), x)  # the layer bias is in quant_bias
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 0.05, (name, err)


def test_percentile_clips_the_range(model, calib, tmp_path):
    full = quantize(model, tmp_path / "full", calib)
    p9999 = quantize(model, tmp_path / "p9999", calib, percentile=99.99)
    p99 = quantize(model, tmp_path / "p99", calib, percentile=99.0)
    scales = [name for name in full if name.endswith("input_scale")]
    assert len(scales) == 14
    for name in scales:
        # each sample's percentile lies inside the global min/max, and a lower P clips more
        assert p99[name].item() <= p9999[name].item() <= full[name].item() * (1 + 1e-6), name
    # activations of tiny random models have outliers: clipping 1 % shrinks every range by a clear margin
    assert all(p99[name].item() < 0.9 * full[name].item() for name in scales)


def test_w8a8_mix_and_plain_text_calibration(model, tmp_path):
    plain = tmp_path / "calib.txt"
    plain.write_text("\n\n".join(TEXTS) + "\n")  # one sample per non-empty line
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("".join(json.dumps({"inputs_pretokenized": t}) + "\n" for t in TEXTS))
    a = quantize(model, tmp_path / "a", plain, scheme="W8A8_MIX")
    b = quantize(model, tmp_path / "b", jsonl, scheme="W8A8_MIX")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.mlp.gate_proj.weight_scale"].shape == (256, 1)
    # fewer samples: another range (the first sample alone is a subset of the tokens)
    c = quantize(model, tmp_path / "c", jsonl, scheme="W8A8_MIX", calib_samples=1)
    assert c["model.layers.0.mlp.down_proj.input_scale"] <= a["model.layers.0.mlp.down_proj.input_scale"]


def test_moe_model_static_attention_dynamic_experts(tmp_path, calib):
    source = make_tiny_model("qwen3_moe", tmp_path / "moe")
    out = tmp_path / "out"
    quantize_model(source, out, "W8A8", calib=calib, calib_seq_len=SEQ_LEN, progress=False,
                   layer_schemes=["*.experts.*=W8A8_DYNAMIC"])  # fmt: skip
    desc = QuantDescription.from_checkpoint(out)
    assert desc.entries["model.layers.1.self_attn.o_proj.input_scale"] == "W8A8"
    assert desc.entries["model.layers.1.mlp.experts.7.down_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert desc.model_quant_type == "W8A8"


def test_bad_calibration_input(model, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "wrong key"}\n')
    with pytest.raises(QuantCoreError, match=re.escape("bad.jsonl:2: expected a JSON object with a string field")):
        quantize_model(model, out, "W8A8", calib=bad, progress=False)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(QuantCoreError, match=re.escape("bad.jsonl:2: not a JSON object")):
        quantize_model(model, out, "W8A8", calib=bad, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(QuantCoreError, match="holds no text samples"):
        quantize_model(model, out, "W8A8", calib=empty, progress=False)
    with pytest.raises(QuantCoreError, match="cannot read calibration file"):
        quantize_model(model, out, "W8A8", calib=tmp_path / "missing.jsonl", progress=False)
    with pytest.raises(QuantCoreError, match="percentile must be in"):
        quantize_model(model, out, "W8A8", calib=empty, percentile=100, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt"]


def test_calibration_ignored_for_dynamic_schemes(model, calib, tmp_path):
    with pytest.warns(UserWarning, match="calibration ignored"):
        summary = quantize_model(model, tmp_path / "out", "W8A8_DYNAMIC", calib=calib, progress=False)
    assert summary.calibrated_layers == 0
