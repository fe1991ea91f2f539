"""quant_core.runtime.load_quantized: tiny float models -> v1-layout checkpoints (written here with each scheme's
quantize_weights) -> a transformers model whose logits are compared with the float model's."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from quant_core import get_scheme
from quant_core.errors import CheckpointTensorError, DescriptionError, DescriptionNotFoundError, UnsupportedSchemeError
from quant_core.primitives import get_decompose_dim
from quant_core.runtime import QuantExperts, QuantLinear, load_quantized
from quant_core.runtime.moe import check_servable
from quant_core.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
load_file, save_file = safetensors_torch.load_file, safetensors_torch.save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# Static W8A8 calibration: fixed ranges ~1.5x the largest inputs the tiny models produce on the test prompts
# (norm outputs reach ±4.3, o_proj / down_proj inputs ±1.8).
ACT_RANGE = {"o_proj": 3.0, "down_proj": 3.0}
DEFAULT_ACT_RANGE = 6.0
SHARD = "quant_model_weights-00001-of-00001.safetensors"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def quantize_layer(quant_type: str, prefix: str, weight, bias, group_size: int) -> dict[str, torch.Tensor]:
    proj = prefix.rpartition(".")[2]
    options = {"row_parallel": proj in ROW_PARALLEL} if quant_type.startswith("W4A8") else {}
    scheme = get_scheme(quant_type, "linear", version="1.0.0", group_size=group_size, **options)
    calibration = {}
    if quant_type in ("W8A8", "W8A8_MIX"):
        r = ACT_RANGE.get(proj, DEFAULT_ACT_RANGE)
        calibration = {"act_min": -r, "act_max": r}
    if "FLATQUANT" in quant_type:  # random orthogonal transforms exercise the transform path (identity would not)
        left_dim, right_dim = get_decompose_dim(weight.shape[1])
        calibration = {"left_trans": random_orthogonal(left_dim), "right_trans": random_orthogonal(right_dim)}
    b = None if bias is None else bias.float()
    return {f"{prefix}.{k}": v for k, v in scheme.quantize_weights(weight.float(), b, **calibration).items()}


def random_orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(n)))
    return q


def write_checkpoint(float_dir: Path, out_dir: Path, linear=None, moe=None, *, group_size=0, edit=None) -> Path:
    """msModelSlim v1 layout: every q/k/v/o/gate/up/down projection (dense or expert) quantized with ``linear`` /
    ``moe`` (None keeps it FLOAT); norms, embeddings, router and lm_head FLOAT. ``edit(tensors, description)``
    may tamper with the result before it is written."""
    source = load_file(float_dir / "model.safetensors")
    tensors, desc = {}, {}
    for name, tensor in source.items():
        prefix, _, suffix = name.rpartition(".")
        quant_type = moe if ".experts." in prefix else linear
        if suffix == "weight" and prefix.rpartition(".")[2] in PROJECTIONS and quant_type:
            layer = quantize_layer(quant_type, prefix, tensor, source.get(f"{prefix}.bias"), group_size)
            tensors.update(layer)
            desc.update(dict.fromkeys(layer, quant_type))
        else:
            tensors[name] = tensor
            desc[name] = "FLOAT"
    if edit:
        edit(tensors, desc)
    out_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / SHARD)
    index = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(tensors, SHARD)}
    (out_dir / "quant_model_weights.safetensors.index.json").write_text(json.dumps(index))
    globals_ = {"version": "1.0.0", "model_quant_type": linear or moe or "FLOAT", "group_size": group_size,
                "metadata": {}, "optional": {}}  # fmt: skip
    (out_dir / "quant_model_description.json").write_text(json.dumps({**desc, **globals_}, indent=1))
    for name in COPIED:
        shutil.copy(float_dir / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {kind: make_tiny_model(kind, root / kind) for kind in ("llama", "qwen2", "qwen3", "qwen3_moe")}


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def float_logits(float_dirs, prompt):
    cache = {}

    def get(kind):
        if kind not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(float_dirs[kind], dtype=torch.float32)
            with torch.no_grad():
                cache[kind] = model(prompt).logits
        return cache[kind]

    return get


def logits(model, prompt):
    with torch.no_grad():
        return model(prompt).logits


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def greedy_agreement(a, b) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


# Relative logit error bounds (‖Δ‖/‖logits‖, float32 activations, reference kernels, seed-0 tiny Qwen3, 48 tokens).
# Each of the 14 quantized projections adds its own error (modelslim-tool.md §5: int8 weights 0.75 %, int4
# per-channel weights 12.6 %, per-group 9-11 %) on top of activation rounding; a float lm_head reads the result.
# Static W8A8 quantizes activations on one fixed range per tensor (ACT_RANGE), a grid ~4x coarser than per-token
# int8 for o_proj / down_proj inputs (rms ~0.3 on a ±3 range). Measured: W8A16 1.6 %, W8A8 5.4 %, W8A8_DYNAMIC /
# _MIX / _FLATQUANT 2.2-2.3 %, W4A16 g64 22.9 %, W4A8 g0 28.3 % (g64 26.5 %, FlatQuant 27.8 %), W4A4 38.5 %
# (int4 activations too). Bounds are ~1.5x the measurement; unrelated logits differ by ~140 %. The FlatQuant
# cases use random orthogonal transforms: a transform applied wrongly would give unrelated logits.
LINEAR_CASES = {
    # (quant_type, group_size): (bound, check greedy agreement)
    ("W8A16", 0): (0.03, True),
    ("W8A8", 0): (0.08, True),
    ("W8A8_DYNAMIC", 0): (0.04, True),
    ("W8A8_MIX", 0): (0.04, True),
    ("W8A8_FLATQUANT_DYNAMIC", 0): (0.04, True),
    ("W4A16", 64): (0.35, False),
    ("W4A8_DYNAMIC", 0): (0.4, False),
    ("W4A8_DYNAMIC", 64): (0.4, False),
    ("W4A8_FLATQUANT_DYNAMIC", 0): (0.4, False),
    ("W4A4_DYNAMIC", 0): (0.6, False),
    ("W4A4_FLATQUANT_DYNAMIC", 0): (0.6, False),
}
# Greedy next tokens of int8 schemes: the tiny random models have flat logits (std 0.5), so a few-% perturbation
# can swap near-ties; 85 % of the 48 positions must agree (measured: 92-100 %).
GREEDY_AGREEMENT = 0.85


@pytest.mark.parametrize(("quant_type", "group_size"), list(LINEAR_CASES))
def test_linear_scheme_logits_close_to_float(quant_type, group_size, float_dirs, float_logits, prompt, tmp_path):
    ckpt = write_checkpoint(float_dirs["qwen3"], tmp_path / "q", quant_type, group_size=group_size)
    model = load_quantized(ckpt, backend="reference", dtype=torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(m.scheme.quant_type == quant_type for m in quantized)
    assert not isinstance(model.lm_head, QuantLinear)
    got, want = logits(model, prompt), float_logits("qwen3")
    bound, int8 = LINEAR_CASES[(quant_type, group_size)]
    assert rel_err(got, want) < bound
    if int8:
        assert greedy_agreement(got, want) >= GREEDY_AGREEMENT


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("quant_type", ["W8A8", "W8A8_DYNAMIC"])
def test_other_architectures(kind, quant_type, float_dirs, float_logits, prompt, tmp_path):
    """Qwen2's q/k/v biases: static W8A8 folds them into quant_bias, W8A8_DYNAMIC adds them (same bounds)."""
    model = load_quantized(write_checkpoint(float_dirs[kind], tmp_path / "q", quant_type), dtype=torch.float32)
    got, want = logits(model, prompt), float_logits(kind)
    assert rel_err(got, want) < LINEAR_CASES[(quant_type, 0)][0]
    assert greedy_agreement(got, want) >= GREEDY_AGREEMENT


# MoE: the experts quantized alone (attention FLOAT), and msModelSlim's mixed form (W8A8_DYNAMIC attention, W4A8
# experts). Errors are larger than the dense ones per quantized weight because top-2 routing is discontinuous: a
# perturbed router input flips near-tied experts. Measured: experts W8A8_DYNAMIC 3.8 %, W8A16 3.7 %, W4A8 12.4 %,
# W4A16 g64 7.9 %; mixed 13.6 %; W8A8_DYNAMIC attention with float experts 6.2 % (every router input perturbed).
MOE_CASES = {
    (None, "W8A8_DYNAMIC", 0): 0.06,
    (None, "W8A16", 0): 0.06,
    (None, "W4A8_DYNAMIC", 0): 0.2,
    (None, "W4A16", 64): 0.15,
    ("W8A8_DYNAMIC", "W4A8_DYNAMIC", 0): 0.25,
    ("W8A8_DYNAMIC", None, 0): 0.1,  # float experts stacked into transformers' own fused module
}


@pytest.mark.parametrize(("linear", "moe", "group_size"), list(MOE_CASES))
def test_moe_logits_close_to_float(linear, moe, group_size, float_dirs, float_logits, prompt, tmp_path):
    ckpt = write_checkpoint(float_dirs["qwen3_moe"], tmp_path / "q", linear, moe, group_size=group_size)
    model = load_quantized(ckpt, backend="reference", dtype=torch.float32)
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, QuantExperts) == (moe is not None)
        assert type(layer.mlp.gate).__name__ == "Qwen3MoeTopKRouter"  # the router stays float
        assert isinstance(layer.self_attn.q_proj, QuantLinear) == (linear is not None)
    got, want = logits(model, prompt), float_logits("qwen3_moe")
    assert rel_err(got, want) < MOE_CASES[(linear, moe, group_size)]
    if "W4" not in f"{linear}{moe}":
        assert greedy_agreement(got, want) >= GREEDY_AGREEMENT


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_all_float_checkpoint_reproduces_float_model(kind, float_dirs, float_logits, prompt, tmp_path):
    """Plumbing check without quantization: embeddings, norms, rotary buffers, stacked float experts. Same float32
    math as transformers' own loading, so equal up to summation order (1e-6)."""
    model = load_quantized(write_checkpoint(float_dirs[kind], tmp_path / "q"), dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear | QuantExperts) for m in model.modules())
    assert rel_err(logits(model, prompt), float_logits(kind)) < 1e-6


def test_tied_embeddings(prompt, tmp_path):
    """Qwen3-0.6B-style tied lm_head: the checkpoint has no lm_head.weight; the embedding is shared."""
    float_dir = make_tiny_model("qwen3", tmp_path / "float", tie_word_embeddings=True)
    model = load_quantized(write_checkpoint(float_dir, tmp_path / "q", "W8A8_DYNAMIC"), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    assert rel_err(logits(model, prompt), logits(reference, prompt)) < LINEAR_CASES[("W8A8_DYNAMIC", 0)][0]


def test_c8_kv_cache_tensors_ignored(float_dirs, prompt, tmp_path):
    """C8 KV-cache scales sit on k_proj / v_proj (modelslim-tool.md §4.12); the runtime keeps a float KV cache and
    skips them (IGNORED_SUFFIXES), so the logits equal the checkpoint's without them."""

    def add_c8(tensors, desc):
        for layer in range(2):
            for proj in ("k_proj", "v_proj"):
                for name in ("kv_cache_scale", "kv_cache_offset"):
                    key = f"model.layers.{layer}.self_attn.{proj}.{name}"
                    tensors[key], desc[key] = torch.full((64,), 0.01), "C8"

    with_c8 = write_checkpoint(float_dirs["qwen3"], tmp_path / "c8", "W8A8_DYNAMIC", edit=add_c8)
    plain = write_checkpoint(float_dirs["qwen3"], tmp_path / "plain", "W8A8_DYNAMIC")
    got = logits(load_quantized(with_c8, backend="reference", dtype=torch.float32), prompt)
    assert torch.equal(got, logits(load_quantized(plain, backend="reference", dtype=torch.float32), prompt))


def test_w8a8_mix_static_mode_is_w8a8(float_dirs, prompt, tmp_path):
    """W8A8_MIX carries the static W8A8 tensors (same calibration here): mode "static" must compute W8A8 exactly."""
    mix = write_checkpoint(float_dirs["qwen3"], tmp_path / "mix", "W8A8_MIX")
    static = write_checkpoint(float_dirs["qwen3"], tmp_path / "w8a8", "W8A8")
    got = logits(load_quantized(mix, backend="reference", dtype=torch.float32, w8a8_mix_mode="static"), prompt)
    want = logits(load_quantized(static, backend="reference", dtype=torch.float32), prompt)
    assert rel_err(got, want) < 1e-6


def _adds(bias):
    return lambda module, args, out: out + bias


def test_m4_biases_applied_like_float(float_dirs, prompt, tmp_path):
    """msModelSlim's anti-outlier m4 adds FLOAT biases the architecture lacks. Reference: the float model with the
    W8A16-dequantized weights (W8A16 keeps activations float, so the only difference is float32 summation order)
    and the same biases added by hand. Bound 1e-5 relative: float32 rounding; the biases move logits by ~10 %."""
    gen = torch.Generator().manual_seed(1)
    biases = {
        "model.layers.0.self_attn.q_proj.bias": torch.randn(128, generator=gen).to(torch.bfloat16),
        "model.layers.1.mlp.up_proj.bias": torch.randn(256, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_norm.bias": torch.randn(32, generator=gen),  # F32, as m4 writes norm biases
        "model.layers.1.input_layernorm.bias": torch.randn(128, generator=gen),
    }

    def inject(tensors, desc):
        tensors.update(biases)
        desc.update(dict.fromkeys(biases, "FLOAT"))

    plain = load_quantized(write_checkpoint(float_dirs["qwen3"], tmp_path / "plain", "W8A16"), dtype=torch.float32)
    ckpt = write_checkpoint(float_dirs["qwen3"], tmp_path / "m4", "W8A16", edit=inject)
    model = load_quantized(ckpt, backend="reference", dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.bias is not None

    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dirs["qwen3"], dtype=torch.float32)
    stored = load_file(ckpt / SHARD)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight_scale" in stored:
            module.weight.data = stored[f"{name}.weight"].float() * stored[f"{name}.weight_scale"]
    for name, bias in biases.items():
        module = reference.get_submodule(name.removesuffix(".bias"))
        if isinstance(module, torch.nn.Linear):
            module.bias = torch.nn.Parameter(bias.float())
        else:
            module.register_forward_hook(_adds(bias.float()))
    got, want = logits(model, prompt), logits(reference, prompt)
    assert rel_err(got, want) < 1e-5
    assert rel_err(logits(plain, prompt), want) > 0.02  # the biases matter: dropping them is caught


def test_default_dtype_and_generate(float_dirs, tmp_path):
    """dtype=None takes config.json's bf16; backend="auto" runs; generate() works through the quantized layers."""
    model = load_quantized(write_checkpoint(float_dirs["qwen3"], tmp_path / "q", "W8A8_DYNAMIC"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.device.type == "meta" for p in model.parameters())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    ids = tokenizer("hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


# backend="cpu" vs "reference". Layer by layer, on the input the cpu layer saw: the int8-activation kernels (fbgemm
# dynamic, FlatQuant, int4-weights, static) reproduce the spec's integer sums, so only the float32 epilogue's
# rounding order differs (measured ≤ 6e-8 per layer) -> 1e-6. MoE experts requantize the SwiGLU output inside, where
# that difference can push one code across a rounding tie: one flip measured 6.8e-4 (W4A8, layer 1) -> 3e-3. The
# weight-only kernels take bf16 activations and return bf16 (2^-9 relative each; measured 2.4e-3 / 3.1e-3) -> 1e-2.
# Logits: a tie flip moves that layer's output by ~2e-4 and cascades through the later layers; measured 1.3e-7 to
# 2.8e-7 (no flip outside MoE internals) for the dynamic, static and MoE cases, 2.5e-3 / 3.6e-3 for the two
# FlatQuant ones (one flip in layer 0's o_proj), W8A16 / W4A16 5.3e-3 / 6.2e-3. 1e-2 bounds them all; the old 7-bit
# activation kernel was off by 3.6-3.9 %.
BACKEND_CASES = {  # (linear, moe): per-layer bound
    ("W8A8_DYNAMIC", None): 1e-6, ("W8A8", None): 1e-6, ("W8A8_MIX", None): 1e-6, ("W4A8_DYNAMIC", None): 1e-6,
    ("W8A8_FLATQUANT_DYNAMIC", None): 1e-6, ("W4A8_FLATQUANT_DYNAMIC", None): 1e-6, (None, "W8A8_DYNAMIC"): 3e-3,
    (None, "W4A8_DYNAMIC"): 3e-3, ("W8A16", None): 1e-2, ("W4A16", None): 1e-2,
}  # fmt: skip
BACKEND_LOGITS = 1e-2


@pytest.mark.parametrize(("linear", "moe"), list(BACKEND_CASES))
def test_cpu_backend_agrees_with_reference(linear, moe, float_dirs, prompt, tmp_path):
    kind = "qwen3_moe" if moe else "qwen3"
    group_size = 64 if linear == "W4A16" else 0
    ckpt = write_checkpoint(float_dirs[kind], tmp_path / "q", linear, moe, group_size=group_size)
    models = {b: load_quantized(ckpt, backend=b, dtype=torch.float32) for b in ("reference", "cpu")}
    layers = {b: {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
              for b, model in models.items()}  # fmt: skip
    assert layers["cpu"] and layers["cpu"].keys() == layers["reference"].keys()
    assert {m.runtime.kernel.backend for m in layers["cpu"].values() if isinstance(m, QuantLinear)} <= {"cpu"}
    seen = {}
    for name, module in layers["cpu"].items():
        module.register_forward_hook(lambda _m, args, out, name=name: seen.__setitem__(name, (args, out)))
    got = logits(models["cpu"], prompt)
    assert seen.keys() == layers["cpu"].keys()
    with torch.no_grad():
        errs = {name: rel_err(out, layers["reference"][name](*args)) for name, (args, out) in seen.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] < BACKEND_CASES[(linear, moe)], f"{worst}: {errs[worst]:.2e}"
    assert rel_err(got, logits(models["reference"], prompt)) < BACKEND_LOGITS


# --- bad input ------------------------------------------------------------------------------------------------
Q = "model.layers.0.self_attn.q_proj"


def _drop_scale(tensors, desc):
    del tensors[f"{Q}.weight_scale"]


def _extra_tensor(tensors, desc):
    tensors["model.layers.1.mlp.mystery.weight"] = torch.zeros(4)
    desc["model.layers.1.mlp.mystery.weight"] = "FLOAT"


def _extra_layer_tensor(tensors, desc):
    tensors[f"{Q}.smooth_factor"] = torch.ones(128)
    desc[f"{Q}.smooth_factor"] = "W8A8_DYNAMIC"


def _nan_scale(tensors, desc):
    tensors[f"{Q}.weight_scale"][3] = math.nan


def _phantom_layer(tensors, desc):
    desc["model.layers.7.mlp.down_proj.weight"] = "W8A8_DYNAMIC"


def _int8_but_float(tensors, desc):
    desc[f"{Q}.weight"] = "FLOAT"


BAD_INPUTS = {
    "missing tensor": (_drop_scale, CheckpointTensorError, f"{Q}.weight_scale"),
    "unexpected tensor": (_extra_tensor, CheckpointTensorError, "model.layers.1.mlp.mystery.weight"),
    "unexpected layer tensor": (_extra_layer_tensor, CheckpointTensorError, f"{Q}.smooth_factor"),
    "nan scale": (_nan_scale, CheckpointTensorError, f"{Q}.weight_scale"),
    "layer the model lacks": (_phantom_layer, DescriptionError, "model.layers.7.mlp.down_proj.weight"),
    "description says FLOAT": (_int8_but_float, CheckpointTensorError, f"{Q}.weight"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_raises_naming_it(case, float_dirs, tmp_path):
    edit, error, name = BAD_INPUTS[case]
    ckpt = write_checkpoint(float_dirs["qwen3"], tmp_path / "q", "W8A8_DYNAMIC", edit=edit)
    with pytest.raises(error, match=name.replace(".", r"\.")):
        load_quantized(ckpt, backend="reference")


def test_missing_description(float_dirs, tmp_path):
    ckpt = write_checkpoint(float_dirs["qwen3"], tmp_path / "q", "W8A8_DYNAMIC")
    (ckpt / "quant_model_description.json").unlink()
    with pytest.raises(DescriptionNotFoundError, match=r"quant_model_description\.json"):
        load_quantized(ckpt)


def test_missing_moe_expert_tensor(float_dirs, tmp_path):
    def drop(tensors, desc):
        del tensors["model.layers.1.mlp.experts.5.down_proj.weight_scale"]

    ckpt = write_checkpoint(float_dirs["qwen3_moe"], tmp_path / "q", None, "W8A8_DYNAMIC", edit=drop)
    with pytest.raises(CheckpointTensorError, match=r"model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight_scale"):
        load_quantized(ckpt, backend="reference")


def test_unservable_experts_module_named():
    class BiasedExperts(torch.nn.Module):
        has_bias = True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    with pytest.raises(UnsupportedSchemeError, match="BiasedExperts"):
        check_servable(BiasedExperts(), "model.layers.0.mlp.experts")
