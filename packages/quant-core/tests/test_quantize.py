"""The quantizer on tiny models: every linear scheme's output loads, validates and dequantizes close to the float
weights; MoE, fused shards, sharding, config handling and atomic writes."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file

from quant_core import QuantDescription, get_scheme, scheme_class, supported_schemes
from quant_core.checkpoint import weight_map
from quant_core.errors import MixedShardsError, QuantCoreError, UnsupportedSchemeError
from quant_core.moe import stack_experts
from quant_core.quantize import quantize_model
from quant_core.quantize import quantizer as quantizer_module
from quant_core.spec import check_tensors
from quant_core.tiny_models import KINDS, make_tiny_model

LINEAR_SCHEMES = [q for q, _ in supported_schemes("linear")]
STATIC = {"W8A8", "W8A8_MIX", "W8A8S"}
ROW_PARALLEL_OPTION = {"W4A8_DYNAMIC", "W4A8_FLATQUANT_DYNAMIC"}
CALIB_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: There are 15 trees in the grove. How many trees did the workers plant today?",
    "Calibration text only needs to exercise every layer with realistic activations.",
    "1234567890 !? mixed CASE words, and some punctuation; done.",
]

# Relative Frobenius error of the dequantized weight vs the float (bf16) weight, per scheme family, for the tiny
# models' Gaussian weights (K = 128..256). RTN with a symmetric per-row scale s = amax/qmax has a rounding error of
# s/√12 per weight, with amax ≈ 3σ: int8 ≈ 3/(127·√12) ≈ 0.7 %, int4 ≈ 3/(7·√12) ≈ 12 % (measured 0.6-0.7 % and
# 11-13 %). Bounds are about 1.5x those, so a wrong scale, sign or packing (errors ≥ 50 %) cannot pass.
INT8_BOUND, INT4_BOUND, FP8_BOUND = 0.012, 0.18, 0.045
BOUNDS = {
    "W8A8": INT8_BOUND,
    "W8A8_MIX": INT8_BOUND,
    "W8A8_DYNAMIC": INT8_BOUND,
    "W8A16": INT8_BOUND,
    "W8A8_FLATQUANT_DYNAMIC": INT8_BOUND,
    "W4A8_DYNAMIC": INT4_BOUND,
    "W4A4_DYNAMIC": INT4_BOUND,
    "W4A16": INT4_BOUND,  # asymmetric over (max-min)/15 per row: ≈ 11 %
    "W4A4_FLATQUANT_DYNAMIC": INT4_BOUND,
    "W4A8_FLATQUANT_DYNAMIC": INT4_BOUND,
    "W8A8S": INT8_BOUND,
    # E4M3 keeps 3 mantissa bits: a rounding error of up to 2^-4 of a value (measured 2.5-2.6 % per channel,
    # 2.9-3.0 % per 32-block, where msModelSlim's exponent rule leaves the block maximum in [256, 448])
    "WFP8AFP8_DYNAMIC": FP8_BOUND,
    "W8A8FP8_DYNAMIC": FP8_BOUND,
    "W8A8_MXFP8": FP8_BOUND,
    # E2M1 per 32-block: measured 11.1-11.5 % (msModelSlim's own output on its tiny Qwen3: 11.2 %)
    "W4A4_MXFP4": INT4_BOUND,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("float")
    return {kind: make_tiny_model(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"inputs_pretokenized": t}) + "\n" for t in CALIB_TEXTS))
    return path


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def quantized_layers(desc: QuantDescription, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{prefix: {suffix: tensor}}`` of every layer whose ``.weight`` entry is not FLOAT (biases excluded: FLOAT)."""
    layers = {}
    for key, qtype in desc.entries.items():
        if key.endswith(".weight") and qtype != "FLOAT":
            prefix = key.removesuffix(".weight")
            layers[prefix] = {
                n[len(prefix) + 1 :]: t
                for n, t in tensors.items()
                if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :] and n != f"{prefix}.bias"
            }
    return layers


def dequantized(qtype: str, scheme, tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """The float ``[N, K]`` weight a layer computes with: ``apply`` on the identity (per-token activation
    quantization of a one-hot row is exact), or for static W8A8 ``weight · deq_scale / input_scale``."""
    runtime = scheme.process_weights(tensors, layer=layer)
    if qtype in ("W8A8", "W8A8S"):
        return tensors["weight"].float() * (tensors["deq_scale"] / tensors["input_scale"])[:, None]
    return scheme.apply(runtime, torch.eye(runtime.kernel.config.in_features)).T


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def check_output(out: Path, source: Path, expected_types: dict[str, str] | None = None, group_size: int = 0) -> dict:
    """Load ``out`` the way a runtime does and check every quantized layer against the float weights; returns the
    per-layer relative errors."""
    desc = QuantDescription.from_checkpoint(out)
    names = weight_map(out)
    assert set(names) == set(desc.entries), "the description must list every tensor, and only those"
    assert desc.version == "1.0.0" and desc.group_size == group_size
    raw = json.loads((out / "quant_model_description.json").read_text())
    assert raw["metadata"] == {} and raw["optional"] == {}
    tensors = read_checkpoint(out)
    floats = read_checkpoint(source)
    for name, t in tensors.items():
        if desc.entries[name] == "FLOAT":
            assert t.dtype == floats[name].dtype and torch.equal(t, floats[name]), f"{name} must be copied unchanged"
    errors = {}
    for prefix, layer_tensors in quantized_layers(desc, tensors).items():
        qtype = desc.entries[f"{prefix}.weight"]
        if expected_types is not None:
            assert qtype == expected_types.get(prefix.rpartition(".")[2], qtype), prefix
        assert all(desc.entries[f"{prefix}.{s}"] == qtype for s in layer_tensors), f"{prefix}: aux tensors' type"
        options = {"version": desc.version, "group_size": desc.group_size}
        if qtype in ROW_PARALLEL_OPTION and prefix.endswith(("o_proj", "down_proj")):
            options["row_parallel"] = True  # weight_specs then expects scale_bias [N, 16]
        scheme = get_scheme(qtype, "linear", backend="reference", **options)
        w = floats[f"{prefix}.weight"].float()
        n, k = w.shape
        check_tensors(scheme.weight_specs(k, n, torch.bfloat16), layer_tensors, prefix)
        for name, t in layer_tensors.items():
            if t.is_floating_point() and name != "weight":
                assert t.dtype == torch.float32, f"{prefix}.{name}: v1 writes scales as float32"
        errors[prefix] = rel_err(dequantized(qtype, scheme, layer_tensors, prefix), w)
        assert errors[prefix] < BOUNDS[qtype], (prefix, qtype, errors[prefix])
    return errors


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES)
def test_every_linear_scheme(scheme, models, calib_file, tmp_path):
    out = tmp_path / "out"
    calib = calib_file if scheme in STATIC else None
    summary = quantize_model(models["qwen3"], out, scheme, calib=calib, progress=False, calib_samples=2)
    # MX blocks are part of the format: the description says group_size 32, as msModelSlim writes it
    errors = check_output(
        out, models["qwen3"], group_size=getattr(scheme_class(scheme, "linear"), "FIXED_GROUP_SIZE", 0)
    )
    assert len(errors) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    # embed_tokens, lm_head: the only 2-D weights kept FLOAT
    assert summary.layers_per_scheme == {"FLOAT": 2, scheme: 14}
    assert 0 < summary.bytes_after < summary.bytes_before
    assert summary.num_shards == 1 and summary.calibrated_layers == (14 if scheme in STATIC else 0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind(kind, models, tmp_path):
    check_output(quantize_model(models[kind], tmp_path / "out", progress=False).out_dir, models[kind])


def test_grouped_schemes(models, tmp_path):
    """W4A16 / W4A8_DYNAMIC with a group size: the global key is written and groups cut the int4 error."""
    per_channel = check_output(quantize_model(models["qwen3"], tmp_path / "c", "W4A16", progress=False).out_dir,
                               models["qwen3"])  # fmt: skip
    out = quantize_model(models["qwen3"], tmp_path / "g", "W4A16", group_size=32, progress=False).out_dir
    grouped = check_output(out, models["qwen3"], group_size=32)
    # 32-wide groups see a smaller range than a whole 128..256-wide row: lower error on every layer
    assert all(grouped[p] < per_channel[p] for p in grouped)
    assert read_checkpoint(out)["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 256 // 32)
    out = quantize_model(models["qwen3"], tmp_path / "w4a8", "W4A8_DYNAMIC", group_size=64, progress=False).out_dir
    check_output(out, models["qwen3"], group_size=64)
    assert read_checkpoint(out)["model.layers.0.self_attn.q_proj.weight_scale_second"].shape == (128, 2)


def test_row_parallel_scale_bias_and_model_quant_type(models, tmp_path):
    out = quantize_model(models["qwen3"], tmp_path / "out", "W4A8_DYNAMIC", progress=False).out_dir
    tensors = read_checkpoint(out)
    assert tensors["model.layers.0.self_attn.o_proj.scale_bias"].shape == (128, 16)
    assert tensors["model.layers.0.mlp.down_proj.scale_bias"].shape == (128, 16)
    assert tensors["model.layers.0.self_attn.q_proj.scale_bias"].shape == (128, 1)
    assert tensors["model.layers.0.mlp.gate_proj.scale_bias"].shape == (256, 1)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 128)  # int4 pairs along N
    # msModelSlim's ranking leaves W4A8_DYNAMIC out: an all-W4A8 model says FLOAT
    assert QuantDescription.from_checkpoint(out).model_quant_type == "FLOAT"
    mixed = quantize_model(models["qwen3"], tmp_path / "mixed", "W4A8_DYNAMIC", progress=False,
                           layer_schemes=["*.self_attn.*=W8A16"]).out_dir  # fmt: skip
    assert QuantDescription.from_checkpoint(mixed).model_quant_type == "W8A16"


def test_moe_experts_quantized_router_float(models, tmp_path):
    source = models["qwen3_moe"]
    out = quantize_model(source, tmp_path / "out", "W8A8_DYNAMIC", progress=False,
                         layer_schemes=["*.experts.*=W4A8_DYNAMIC"]).out_dir  # fmt: skip
    errors = check_output(out, source)
    desc = QuantDescription.from_checkpoint(out)
    for i in range(2):
        assert desc.entries[f"model.layers.{i}.mlp.gate.weight"] == "FLOAT"
        assert desc.quant_type_for(f"model.layers.{i}.mlp.experts", "moe") == "W4A8_DYNAMIC"
    assert sum("experts" in p for p in errors) == 2 * 8 * 3  # every expert projection of both layers
    assert desc.model_quant_type == "W8A8_DYNAMIC"  # the attention; W4A8 is left out of the ranking
    # the stacked MoE scheme loads the per-expert tensors, expert down_proj with the row-parallel scale_bias
    tensors = read_checkpoint(out)
    stacked = stack_experts({k: v for k, v in tensors.items() if k.startswith("model.layers.0.mlp.experts.")})
    assert stacked["w2_scale_bias"].shape == (8, 128, 16) and stacked["w13_scale_bias"].shape == (8, 128, 1)
    moe = get_scheme("W4A8_DYNAMIC", "moe", backend="reference", version="1.0.0")
    moe.process_weights(stacked, layer="model.layers.0.mlp.experts")


def test_fused_shards_must_share_a_scheme(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MixedShardsError) as e:
        quantize_model(models["qwen3"], out, layer_schemes=["*.q_proj=W8A16"], progress=False)
    assert "q_proj, k_proj, v_proj" in str(e.value) and "--layer-scheme *.q_proj=W8A16" in str(e.value)
    with pytest.raises(MixedShardsError, match="gate_proj, up_proj"):
        quantize_model(models["qwen3"], out, skip=["*.up_proj"], progress=False)
    with pytest.raises(MixedShardsError, match=re.escape("routed experts of model.layers.0.mlp.experts")):
        quantize_model(models["qwen3_moe"], out, layer_schemes=["*.experts.3.*=W8A16"], progress=False)
    with pytest.raises(MixedShardsError, match="gate_proj, up_proj"):  # a split inside one expert
        quantize_model(models["qwen3_moe"], out, skip=["*.experts.*.gate_proj"], progress=False)
    assert not out.exists()
    # a pattern covering the whole group is fine; the fused group stays consistent
    done = quantize_model(models["qwen3"], out, layer_schemes=["re:self_attn\\.[qkv]_proj=W8A16"], progress=False)
    desc = QuantDescription.from_checkpoint(done.out_dir)
    assert (
        desc.quant_type_for("model.layers.0.self_attn.qkv_proj", "linear", {"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
        == "W8A16"
    )


def test_moe_experts_need_a_moe_scheme(models, tmp_path):
    with pytest.raises(UnsupportedSchemeError, match="no MoE scheme") as e:
        quantize_model(models["qwen3_moe"], tmp_path / "out", "W4A4_DYNAMIC", progress=False)
    assert "*.experts.*=W8A8_DYNAMIC" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_patterns_skip_and_precedence(models, tmp_path):
    out = quantize_model(
        models["qwen3"], tmp_path / "out", "W8A8_DYNAMIC", progress=False,
        layer_schemes=["model.layers.1.*=W8A16", "re:layers\\.1\\.mlp=W4A8_DYNAMIC"],  # the later rule wins
        skip=["model.layers.0.self_attn.o_proj"],
    ).out_dir  # fmt: skip
    entries = QuantDescription.from_checkpoint(out).entries
    assert entries["model.layers.0.self_attn.o_proj.weight"] == "FLOAT"
    assert entries["model.layers.0.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    assert entries["model.layers.1.self_attn.q_proj.weight"] == "W8A16"
    assert entries["model.layers.1.mlp.down_proj.weight"] == "W4A8_DYNAMIC"
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_norm.weight"):  # fmt: skip
        assert entries[name] == "FLOAT"
    check_output(out, models["qwen3"])
    # skipping an always-FLOAT layer is harmless; a rule that reaches one without naming it is refused
    quantize_model(models["qwen3"], tmp_path / "o2", skip=["lm_head"], progress=False)
    with pytest.raises(QuantCoreError, match="stay FLOAT unless named"):
        quantize_model(models["qwen3"], tmp_path / "o3", layer_schemes=["*embed*=W8A16"], progress=False)


def test_biases_stay_float(models, tmp_path):
    out = quantize_model(models["qwen2"], tmp_path / "out", "W8A16", progress=False).out_dir
    desc = QuantDescription.from_checkpoint(out)
    assert desc.entries["model.layers.0.self_attn.q_proj.bias"] == "FLOAT"
    assert read_checkpoint(out)["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16


def test_shards_index_and_headers(models, tmp_path):
    out = quantize_model(models["qwen3"], tmp_path / "out", progress=False, max_shard_bytes=100_000).out_dir
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and [s.name for s in shards] == [
        f"quant_model_weights-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    tensors = read_checkpoint(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        raw = shard.read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        assert "__metadata__" not in header
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert data <= 100_000 or len(header) == 1  # only a single oversized tensor may exceed the limit
    check_output(out, models["qwen3"])


def test_config_and_side_files(models, tmp_path):
    source = tmp_path / "src"
    make_tiny_model("qwen3", source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (source / "config.json").write_text(json.dumps(config))
    out = quantize_model(source, tmp_path / "out", progress=False).out_dir
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and written["model_type"] == "qwen3"
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not (out / "model.safetensors").exists()
    out2 = quantize_model(source, tmp_path / "out2", progress=False, add_quantization_config=True).out_dir
    assert json.loads((out2 / "config.json").read_text())["quantization_config"] == {"quant_method": "ascend"}


def test_fp16_model_dtypes(tmp_path, calib_file):
    source = make_tiny_model("llama", tmp_path / "fp16", dtype=torch.float16)
    out = quantize_model(source, tmp_path / "out", "W8A8", calib=calib_file, calib_samples=2, progress=False).out_dir
    tensors = read_checkpoint(out)
    prefix = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{prefix}.deq_scale"].dtype == torch.int64  # fp16 models store deq_scale as float32 bits
    assert tensors[f"{prefix}.input_scale"].dtype == torch.float32
    assert tensors[f"{prefix}.quant_bias"].dtype == torch.int32
    assert tensors["model.norm.weight"].dtype == torch.float16


# --- bad input: clear errors, nothing written -------------------------------------------------------------------
def test_bad_inputs(models, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(QuantCoreError, match=re.escape("no *.safetensors")):
        quantize_model(empty, out, progress=False)
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(QuantCoreError, match=re.escape("pytorch_model.bin: pickle files")):
        quantize_model(empty, out, progress=False)
    with pytest.raises(UnsupportedSchemeError, match="W8A8_DYNAMIC") as e:
        quantize_model(models["qwen3"], out, "W8A8_DYNAMC", progress=False)
    assert "did you mean" in str(e.value)
    with pytest.raises(UnsupportedSchemeError):
        quantize_model(models["qwen3"], out, layer_schemes=["*.o_proj=INT3"], progress=False)
    with pytest.raises(QuantCoreError, match=re.escape("--skip *.q_prj: the pattern matches no linear layer")):
        quantize_model(models["qwen3"], out, skip=["*.q_prj"], progress=False)
    with pytest.raises(QuantCoreError, match="PATTERN=SCHEME"):
        quantize_model(models["qwen3"], out, layer_schemes=["*.o_proj"], progress=False)
    with pytest.raises(QuantCoreError, match="pass --calib FILE"):
        quantize_model(models["qwen3"], out, "W8A8_MIX", progress=False)
    with pytest.raises(QuantCoreError, match="only applies to W4A16, W4A8_DYNAMIC"):
        quantize_model(models["qwen3"], out, "W8A16", group_size=64, progress=False)
    with pytest.raises(QuantCoreError, match=re.escape("already holds a quant_model_description.json")):
        quantize_model(quantize_model(models["qwen3"], tmp_path / "q", progress=False).out_dir, out, progress=False)
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text("{}")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)},
              fp8 / "model.safetensors")  # fmt: skip
    with pytest.raises(QuantCoreError, match="stored as F8_E4M3, not as a float: the checkpoint is already quantized"):
        quantize_model(fp8, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fp8", "q"]  # no temporary directories left


def test_group_size_must_divide_k(tmp_path):
    # K = 576 (SmolLM2's hidden size) for q/k/v/o/gate/up; 128 does not divide it
    source = make_tiny_model("llama", tmp_path / "m", hidden_size=576, intermediate_size=256)
    with pytest.raises(QuantCoreError) as e:
        quantize_model(source, tmp_path / "out", "W4A16", group_size=128, progress=False)
    message = str(e.value)
    assert "group size 128 does not divide in_features 576" in message and "16, 32, 64, or 0" in message
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(QuantCoreError, match="--overwrite"):
        quantize_model(models["qwen3"], out, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    quantize_model(models["qwen3"], out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "quant_model_description.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(QuantCoreError, match="model directory itself"):
        quantize_model(models["qwen3"], models["qwen3"], progress=False, overwrite=True)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_out_dir_untouched(models, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    calls = []
    real_add = quantizer_module.ShardWriter.add

    def failing_add(self, name, tensor, quant_type):
        calls.append(name)
        if len(calls) == 40:  # after several shards were written (2 kB shards)
            raise RuntimeError("disk full")
        real_add(self, name, tensor, quant_type)

    monkeypatch.setattr(quantizer_module.ShardWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_model(models["qwen3"], out, progress=False, max_shard_bytes=2000, overwrite=existing)
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])

    monkeypatch.setattr(quantizer_module.ShardWriter, "add", real_add)
    monkeypatch.setattr(quantizer_module, "write_description", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        quantize_model(models["qwen3"], out, progress=False, overwrite=existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_model_quant_type_ranks_flatquant_as_its_inner_scheme():
    from quant_core.quantize import model_quant_type

    # What msModelSlim v1 wrote (modelslim-tool.md §4.3, and its FlatQuant + linear run in the compat harness).
    assert model_quant_type(["W8A8_FLATQUANT_DYNAMIC", "W4A8_FLATQUANT_DYNAMIC", "FLOAT"]) == "W8A8_DYNAMIC"
    assert model_quant_type(["FLOAT_FLATQUANT", "FLOAT"]) == "FLOAT"
    assert model_quant_type(["W4A8_DYNAMIC", "FLOAT"]) == "FLOAT"
