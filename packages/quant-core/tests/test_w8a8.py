import npu_emulator
import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, SHAPES, make_input, make_weight, output_tolerance, rel_err

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError

# Every backend (the fbgemm one included: its split keeps the activations 7-bit, so nothing saturates) reproduces
# the spec's integer arithmetic. What is left against the float64 reference is float32 epilogue rounding (~1e-7)
# and, rarely, a one-LSB flip of x_q where x / s_in sits on a rounding tie in one precision but not the other
# (the NPU multiplies by the float32 reciprocal): ≤ 1/128 of one term of a K-term sum. 1e-4 leaves room for that
# and catches any real mistake (a missing quant_bias or offset, or an added float bias, is ≥ 1e-2).
EXACT = 1e-4
INPUT_SCALE = 0.03  # x ~ N(0, 1): |x| / s_in reaches ~130, so the clamp to [-128, 127] is exercised too
INPUT_OFFSET = -2.0  # msModelSlim's observed offset: really asymmetric


def encode_int64(scale: torch.Tensor) -> torch.Tensor:
    """float32 bits in the low word of an int64 (modelslim-format §4), written here independently."""
    return scale.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def static_checkpoint(k: int, n: int, *, v0: bool = False, fp16: bool = False, seed: int = 1):
    """A W8A8 checkpoint as msModelSlim writes it: v1 (float32 input_*, no weight_*) or v0 (model-dtype input_*
    plus weight_scale / weight_offset); deq_scale int64-encoded for fp16 models."""
    g = torch.Generator().manual_seed(seed)
    model_dtype = torch.float16 if fp16 else torch.bfloat16
    deq = torch.rand(n, generator=g) * 1e-4 + 1e-5
    ckpt = {
        "weight": torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8),
        "input_scale": torch.tensor([INPUT_SCALE]),
        "input_offset": torch.tensor([INPUT_OFFSET]),
        "quant_bias": torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32),
        "deq_scale": encode_int64(deq) if fp16 else deq,
    }
    if v0:
        ckpt["input_scale"] = ckpt["input_scale"].to(model_dtype)
        ckpt["input_offset"] = ckpt["input_offset"].to(model_dtype)
        ckpt["weight_scale"] = (deq[:, None] / INPUT_SCALE).to(model_dtype)
        ckpt["weight_offset"] = torch.zeros(n, 1, dtype=model_dtype)
    return ckpt


def static_reference(ckpt, x):
    """float64 spec: x_q = clamp(round(x / s_in + o_in)), y = (x_q W_qᵀ + quant_bias) · deq_scale; no float bias."""
    s_in, o_in = ckpt["input_scale"].double(), ckpt["input_offset"].double()
    deq = ckpt["deq_scale"]
    deq = (deq & 0xFFFFFFFF).to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
    x_q = torch.clamp(torch.round(x.double() / s_in + o_in), -128, 127)
    return (x_q @ ckpt["weight"].double().T + ckpt["quant_bias"].double()) * deq.double()


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend, version="1.0.0")
    ckpt = static_checkpoint(k, n)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    y = scheme.apply(runtime, x, torch.randn(n).to(dtype))  # the float bias is folded in quant_bias: ignored
    assert y.shape == (*batch, n) and y.dtype == dtype
    err, bound = rel_err(y, static_reference(ckpt, x)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


@pytest.mark.parametrize("v0", [False, True])
def test_fp16_model_with_int64_deq_scale(backend, v0):
    # fp16 outputs round at 2^-11 relative; 2e-3 is ~4x that.
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend)
    ckpt = static_checkpoint(576, 96, v0=v0, fp16=True)
    assert ckpt["deq_scale"].dtype == torch.int64
    x = make_input((5,), 576, torch.float16)
    y = scheme.apply(scheme.process_weights(ckpt), x)
    assert y.dtype == torch.float16
    assert rel_err(y, static_reference(ckpt, x)) < 2e-3


def test_int64_and_float32_deq_scale_agree(backend):
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend)
    ckpt = static_checkpoint(64, 48)
    encoded = dict(ckpt, deq_scale=encode_int64(ckpt["deq_scale"]))
    x = make_input((3,), 64, torch.float32)
    y_f32 = scheme.apply(scheme.process_weights(ckpt), x)
    assert torch.equal(scheme.apply(scheme.process_weights(encoded), x), y_f32)


def test_v0_checkpoint_with_model_dtype_scales(backend):
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend, version="0")
    ckpt = static_checkpoint(96, 33, v0=True)
    assert ckpt["input_scale"].dtype == torch.bfloat16 and "weight_scale" in ckpt
    x = make_input((2, 5), 96, torch.bfloat16)
    y = scheme.apply(scheme.process_weights(ckpt, layer="L"), x)
    assert rel_err(y, static_reference(ckpt, x)) < output_tolerance(torch.bfloat16, EXACT)


def test_float_bias_is_not_added(backend):
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend)
    runtime = scheme.process_weights(static_checkpoint(64, 48))
    x = make_input((4,), 64, torch.float32)
    assert torch.equal(scheme.apply(runtime, x, torch.full((48,), 100.0)), scheme.apply(runtime, x))


def test_input_offset_shifts_the_grid(backend):
    # A non-zero offset must enter both x_q and nothing else: -2 and 0 give different, each-correct outputs.
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend)
    x = make_input((6,), 64, torch.float32)
    outs = []
    for offset in (-2.0, 0.0):
        ckpt = dict(static_checkpoint(64, 48), input_offset=torch.tensor([offset]))
        outs.append(scheme.apply(scheme.process_weights(ckpt), x))
        assert rel_err(outs[-1], static_reference(ckpt, x)) < EXACT
    assert rel_err(outs[0], outs[1]) > 1e-2


def test_saturating_inputs_stay_exact(backend):
    # All activations at the int8 extremes times all-extreme weights: the worst case for int16 saturation of
    # u8·s8 pairs on AVX2 (cpu-kernels §4). The CPU kernel splits activations into 7-bit halves to stay exact.
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend)
    ckpt = static_checkpoint(256, 16)
    ckpt["weight"] = torch.where(torch.arange(16)[:, None] % 2 == 0, 127, -128).to(torch.int8).expand(16, 256)
    ckpt["weight"] = ckpt["weight"].contiguous()
    for value in (1e3, -1e3):
        x = torch.full((2, 256), value)
        assert rel_err(scheme.apply(scheme.process_weights(ckpt), x), static_reference(ckpt, x)) < 1e-6


def test_npu_path_calls_the_upstream_ops(npu, monkeypatch):
    seen = []
    matmul = npu_emulator.npu_quant_matmul
    monkeypatch.setattr(npu_emulator, "npu_quant_matmul", lambda *a, **kw: seen.append((a, kw)) or matmul(*a, **kw))
    scheme = quant_core.get_scheme("W8A8", "linear", backend="npu")
    runtime = scheme.process_weights(static_checkpoint(64, 48))
    assert runtime["weight"].shape == (64, 48)  # [K, N] as npu_quant_matmul wants it
    assert runtime["input_scale_reciprocal"].shape == runtime["input_offset"].shape == (64,)  # repeated to K
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    scheme.apply(runtime, make_input((3,), 64, torch.float16))
    assert npu == ["npu_format_cast", "npu_quantize", "npu_quant_matmul", "npu_quantize", "npu_quant_matmul"]
    (_, _, bf16_scale), bf16_kw = seen[0]
    assert bf16_scale.dtype == torch.float32 and bf16_kw["bias"].dtype == torch.int32  # quant_bias, not float bias
    assert seen[1][0][2].dtype == torch.int64  # fp16 models: the int64-encoded deq_scale


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quantize_process_apply_round_trip(k, n, backend_name, with_bias):
    # Per-channel int8 weights (≈0.7 % rms error for Gaussian rows) plus per-tensor int8 activations calibrated on
    # this input's range (step ≈ 7.5σ / 255, rms error ≈ step / √12 ≈ 0.85 % of σ) add to ≈1.1 %; quant_bias
    # rounds the folded float bias to half a deq_scale (negligible). 3e-2 bounds it with margin.
    scheme = quant_core.get_scheme("W8A8", "linear", backend=backend_name)
    weight, x = make_weight(n, k), make_input((16,), k, torch.float32)
    bias = torch.randn(n) * 0.5 if with_bias else None
    tensors = scheme.quantize_weights(weight, bias, act_min=x.min().item(), act_max=x.max().item())
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == {s for s in specs if not specs[s].optional}  # v1 layout: no weight_scale/offset
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["input_scale"].dtype == tensors["input_offset"].dtype == tensors["deq_scale"].dtype == torch.float32
    y = scheme.apply(scheme.process_weights(tensors), x, bias)  # bias passed but not added: it is folded
    ref = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert rel_err(y, ref) < 3e-2


def test_quantize_weights_folds_bias_and_offset():
    weight, bias = make_weight(48, 64), torch.randn(48)
    tensors = quant_core.get_scheme("W8A8", "linear").quantize_weights(weight, bias, act_min=-1.0, act_max=3.0)
    s_in, o_in = tensors["input_scale"].item(), tensors["input_offset"].item()
    assert s_in == pytest.approx(4.0 / 255, rel=1e-6) and o_in == round(-128 + 1.0 / s_in) == -64  # x=-1 -> -128
    s_w = weight.double().abs().amax(dim=1) / 127
    deq = tensors["deq_scale"].double()
    assert torch.allclose(deq, s_in * s_w, rtol=1e-6)
    expected = torch.round(bias.double() / deq) - o_in * tensors["weight"].double().sum(dim=1)
    assert torch.equal(tensors["quant_bias"], expected.to(torch.int32))


def test_quantize_weights_fp16_writes_int64_deq_scale_and_accepts_explicit_scale():
    weight = make_weight(48, 64).half()
    scheme = quant_core.get_scheme("W8A8", "linear", backend="reference")
    tensors = scheme.quantize_weights(weight, input_scale=torch.tensor([0.03]), input_offset=torch.tensor([-2.0]))
    assert tensors["deq_scale"].dtype == torch.int64
    quant_core.check_tensors(scheme.weight_specs(64, 48, torch.float16), tensors, "layer")
    assert scheme.weight_specs(64, 48, torch.float16)["deq_scale"].dtype == torch.int64
    x = make_input((8,), 64, torch.float16)
    y = scheme.apply(scheme.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < 3e-2


def test_zero_weight_rows_get_a_usable_scale():
    weight = make_weight(8, 64)
    weight[3] = 0
    scheme = quant_core.get_scheme("W8A8", "linear", backend="reference")
    tensors = scheme.quantize_weights(weight, torch.ones(8), act_min=-4.0, act_max=4.0)
    deq = tensors["deq_scale"]
    assert deq[3] == deq.min() > 0
    y = scheme.apply(scheme.process_weights(tensors), torch.randn(2, 64))
    assert torch.allclose(y[:, 3], torch.ones(2), atol=deq[3].item() / 2)  # only its folded bias, rounded


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        ({}, r"needs the activation range"),
        ({"act_min": -1.0}, r"needs the activation range"),
        ({"input_offset": torch.tensor([1.0])}, r"needs the activation range"),
        ({"act_min": 1.0, "act_max": -1.0}, r"not a range"),
        ({"act_min": float("nan"), "act_max": 1.0}, r"not a range"),
        ({"input_scale": torch.tensor([0.0])}, r"'calibration\.input_scale' has 1 zero or negative"),
        ({"input_scale": torch.tensor([0.1, 0.2])}, r"single values"),
        ({"input_scale": 0.1, "input_offset": 0.5}, r"calibration\.input_offset is \[0\.5\], expected an integer"),
        ({"scale": 0.1}, r"unknown calibration argument\(s\) scale"),
    ],
)
def test_quantize_weights_rejects_bad_calibration(calibration, match):
    scheme = quant_core.get_scheme("W8A8", "linear")
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.quantize_weights(make_weight(8, 16), **calibration)


def test_quantize_weights_rejects_a_bias_that_overflows_int32():
    scheme = quant_core.get_scheme("W8A8", "linear")
    with pytest.raises(CheckpointTensorError, match="does not fit int32"):
        scheme.quantize_weights(make_weight(8, 16), torch.full((8,), 1e9), act_min=-1.0, act_max=1.0)


def _set(name, index, value):
    return lambda c: c.__setitem__(name, c[name].clone().index_fill_(0, torch.tensor([index]), value))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_set("input_scale", 0, float("nan")), r"'L\.input_scale' contains NaN or Inf"),
        (_set("input_scale", 0, 0.0), r"'L\.input_scale' has 1 zero or negative scale"),
        (_set("input_scale", 0, -0.1), r"'L\.input_scale' has 1 zero or negative scale"),
        (_set("deq_scale", 7, 0.0), r"'L\.deq_scale' has 1 zero or negative scale"),
        (_set("deq_scale", 7, float("inf")), r"'L\.deq_scale' contains NaN or Inf"),
        (lambda c: c.update(deq_scale=encode_int64(torch.full((48,), float("nan")))), r"'L\.deq_scale' contains NaN"),
        (lambda c: c.update(deq_scale=torch.zeros(48, dtype=torch.int64)), r"'L\.deq_scale' has 48 zero or negative"),
        (_set("input_offset", 0, 0.5), r"L\.input_offset is \[0\.5\], expected an integer in \[-128, 127\]"),
        (_set("input_offset", 0, 300.0), r"L\.input_offset is \[300\.0\], expected an integer"),
        (_set("input_offset", 0, float("nan")), r"'L\.input_offset' contains NaN"),
        (lambda c: c.update(quant_bias=c["quant_bias"].float()), r"'L\.quant_bias' has dtype torch\.float32, exp"),
        (lambda c: c.update(quant_bias=c["quant_bias"].long()), r"'L\.quant_bias' has dtype torch\.int64, expected"),
        (lambda c: c.update(quant_bias=c["quant_bias"][:47]), r"'L\.quant_bias' has shape \(47,\), expected \(48,\)"),
        (lambda c: c.update(deq_scale=c["deq_scale"].double()), r"'L\.deq_scale' has dtype torch\.float64"),
        (lambda c: c.update(input_scale=torch.ones(2)), r"'L\.input_scale' has shape \(2,\), expected \(1,\)"),
        (lambda c: c.update(weight=c["weight"].float()), r"'L\.weight' has dtype torch\.float32, expected torch\.int8"),
        (lambda c: c.pop("deq_scale"), r"'L' is missing L\.deq_scale"),
        (lambda c: c.pop("input_offset"), r"'L' is missing L\.input_offset"),
        (lambda c: c.update(scale_bias=torch.ones(48, 1)), r"does not use: L\.scale_bias"),
    ],
)
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = static_checkpoint(64, 48)
    change(ckpt)
    scheme = quant_core.get_scheme("W8A8", "linear")
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.process_weights(ckpt, layer="L")


def test_int8_input_offset_as_upstream_declares_it():
    ckpt = dict(static_checkpoint(64, 48), input_offset=torch.tensor([-2], dtype=torch.int8))
    scheme = quant_core.get_scheme("W8A8", "linear", backend="reference")
    x = make_input((3,), 64, torch.float32)
    assert rel_err(scheme.apply(scheme.process_weights(ckpt), x), static_reference(ckpt, x)) < EXACT


def test_chooser_explains_an_impossible_backend():
    scheme = quant_core.get_scheme("W8A8", "linear", backend="npu")
    with pytest.raises(KernelUnavailableError, match="npu-int8-static: torch_npu is not installed"):
        scheme.process_weights(static_checkpoint(64, 48))


def test_auto_prefers_the_fast_cpu_kernel():
    runtime = quant_core.get_scheme("W8A8", "linear").process_weights(static_checkpoint(64, 48))
    assert runtime.kernel.name == "cpu-fbgemm-int8-static"
