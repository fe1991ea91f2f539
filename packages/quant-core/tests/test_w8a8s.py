import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, SHAPES, make_input, make_weight, output_tolerance, rel_err

import quant_core
from quant_core import CheckpointTensorError

# As for W8A8 (test_w8a8.py): every backend reproduces the integer arithmetic; float32 epilogue rounding and a rare
# one-LSB flip of x_q at a rounding tie (≤ 1/128 of one of K terms) stay far below 1e-4.
EXACT = 1e-4


def encode_int64(scale: torch.Tensor) -> torch.Tensor:
    return scale.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def w8a8s_checkpoint(k: int, n: int, *, fp16: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """What msModelSlim 26.1.0's v0 pipeline writes for W8A8S (modelslim-tool.md §4.4, and its tiny-Qwen3 output):
    int8 weights in about ±12 with ~15 % zeros, model-dtype input_scale / input_offset, int32 quant_bias, float32
    deq_scale (int64 float32 bits for fp16 models), no weight_scale / weight_offset."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-12, 13, (n, k), generator=g, dtype=torch.int8)
    weight[torch.rand(n, k, generator=g) < 0.15] = 0
    deq = torch.rand(n, generator=g) * 1e-3 + 1e-4
    model_dtype = torch.float16 if fp16 else torch.bfloat16
    return {
        "weight": weight,
        "input_scale": torch.tensor([0.025], dtype=model_dtype),
        "input_offset": torch.tensor([-4.0], dtype=model_dtype),
        "quant_bias": torch.randint(-1500, 1500, (n,), generator=g, dtype=torch.int32),
        "deq_scale": encode_int64(deq) if fp16 else deq,
    }


def reference(ckpt, x):
    """float64 spec: x_q = clamp(round(x / s_in + o_in), -128, 127), y = (x_q W_qᵀ + quant_bias) · deq_scale."""
    s_in, o_in = ckpt["input_scale"].double(), ckpt["input_offset"].double()
    deq = ckpt["deq_scale"]
    deq = (deq & 0xFFFFFFFF).to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
    x_q = torch.clamp(torch.round(x.double() / s_in + o_in), -128, 127)
    return (x_q @ ckpt["weight"].double().T + ckpt["quant_bias"].double()) * deq.double()


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W8A8S", "linear", backend=backend, version="0")
    ckpt = w8a8s_checkpoint(k, n)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    y = scheme.apply(runtime, x, torch.randn(n).to(dtype))  # the float bias is folded into quant_bias: ignored
    assert y.shape == (*batch, n) and y.dtype == dtype
    err, bound = rel_err(y, reference(ckpt, x)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


def test_fp16_model_with_int64_deq_scale(backend):
    # fp16 outputs round at 2^-11 relative; 2e-3 is ~4x that.
    scheme = quant_core.get_scheme("W8A8S", "linear", backend=backend)
    ckpt = w8a8s_checkpoint(576, 96, fp16=True)
    x = make_input((5,), 576, torch.float16)
    y = scheme.apply(scheme.process_weights(ckpt), x)
    assert y.dtype == torch.float16 and rel_err(y, reference(ckpt, x)) < 2e-3


def test_npu_path_calls_the_upstream_ops(npu):
    scheme = quant_core.get_scheme("W8A8S", "linear", backend="npu")
    runtime = scheme.process_weights(w8a8s_checkpoint(64, 48))
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    assert npu == ["npu_format_cast", "npu_quantize", "npu_quant_matmul"]


def test_float_bias_is_not_added_and_the_type_is_reported():
    scheme = quant_core.get_scheme("W8A8S", "linear", backend="reference")
    assert scheme.quant_type == "W8A8S"
    runtime = scheme.process_weights(w8a8s_checkpoint(64, 48))
    assert runtime.kernel.config.quant_type == "W8A8S"
    x = make_input((4,), 64, torch.float32)
    assert torch.equal(scheme.apply(runtime, x, torch.full((48,), 100.0)), scheme.apply(runtime, x))


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # Full-range int8 per-channel weights (≈ 0.7 %) and static asymmetric int8 activations over the calibrated range
    # [-4, 4] (step 8/255: ≈ 0.9 % of a unit-variance input) add in quadrature to ≈ 1.2 % (measured 1.0-1.2 %);
    # 3e-2 bounds that with margin, while a wrong zero point or scale gives ≥ 10 %.
    scheme = quant_core.get_scheme("W8A8S", "linear", backend=backend_name)
    weight, bias = make_weight(n, k), torch.randn(n) * 0.1
    tensors = scheme.quantize_weights(weight, bias, act_min=-4.0, act_max=4.0)
    assert set(tensors) == {"weight", "input_scale", "input_offset", "quant_bias", "deq_scale"}  # msModelSlim's set
    quant_core.check_tensors(scheme.weight_specs(k, n, torch.bfloat16), tensors, "layer")
    x = make_input((16,), k, torch.float32).clamp(-4, 4)
    y = scheme.apply(scheme.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T + bias.double()) < 3e-2


def test_quantize_weights_needs_calibration():
    scheme = quant_core.get_scheme("W8A8S", "linear")
    with pytest.raises(CheckpointTensorError, match="static W8A8 needs the activation range"):
        scheme.quantize_weights(make_weight(8, 64))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].float()), r"'L\.weight' has dtype torch\.float32, expected torch\.int8"),
        (lambda c: c.update(input_offset=torch.tensor([0.5])), r"L\.input_offset is \[0\.5\], expected an integer"),
        (lambda c: c.update(input_scale=torch.tensor([0.0])), r"'L\.input_scale' has 1 zero or negative scale"),
        (lambda c: c.pop("quant_bias"), r"'L' is missing L\.quant_bias"),
        (lambda c: c.update(deq_scale=c["deq_scale"][:5]), r"'L\.deq_scale' has shape \(5,\), expected \(48,\)"),
    ],
)  # fmt: skip
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = w8a8s_checkpoint(64, 48)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        quant_core.get_scheme("W8A8S", "linear").process_weights(ckpt, layer="L")
