import pytest
import torch
from linear_cases import (
    ACT_DTYPES,
    SHAPES,
    fake_quant_per_token,
    make_input,
    make_weight,
    output_tolerance,
    rel_err,
)
from test_w8a8 import EXACT, encode_int64, static_checkpoint, static_reference

import quant_core
from quant_core import CheckpointTensorError, UnsupportedSchemeError


def mix_checkpoint(k: int, n: int, *, v0: bool = False, fp16: bool = False, seed: int = 1):
    """The W8A8 set plus weight_scale / weight_offset [N, 1] (float32 in v1, model dtype in v0; zero offsets)."""
    ckpt = static_checkpoint(k, n, v0=v0, fp16=fp16, seed=seed)
    if not v0:
        g = torch.Generator().manual_seed(seed + 1)
        ckpt["weight_scale"] = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
        ckpt["weight_offset"] = torch.zeros(n, 1)
    return ckpt


def dynamic_reference(ckpt, x, bias=None, act_quant=True):
    """float64 W8A8_DYNAMIC spec on the checkpoint's weight_scale: y = fq_tok(x) (W_q · s_w)ᵀ + bias."""
    w = ckpt["weight"].double() * ckpt["weight_scale"].double()
    y = (fake_quant_per_token(x, 127) if act_quant else x.double()) @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", [(), (2, 5)])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_apply_matches_float64_reference(backend, mode, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W8A8_MIX", "linear", backend=backend, version="1.0.0", mode=mode)
    ckpt = mix_checkpoint(k, n)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = scheme.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    if mode == "static":  # the float bias is folded in quant_bias: not added
        err, bound = rel_err(y, static_reference(ckpt, x)), output_tolerance(dtype, EXACT)
    else:  # every backend's dynamic path is exact per-token int8 too (see test_w8a8_dynamic.py)
        err, bound = rel_err(y, dynamic_reference(ckpt, x, bias)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}/{mode}: rel err {err:.2e} ≥ {bound:.0e}"


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("fp16", [False, True])
def test_v0_checkpoint_with_model_dtype_scales(mode, fp16):
    scheme = quant_core.get_scheme("W8A8_MIX", "linear", backend="reference", version="0", mode=mode)
    ckpt = mix_checkpoint(96, 33, v0=True, fp16=fp16)
    assert ckpt["weight_scale"].dtype == ckpt["input_scale"].dtype != torch.float32
    dtype = torch.float16 if fp16 else torch.bfloat16
    x = make_input((4,), 96, dtype)
    y = scheme.apply(scheme.process_weights(ckpt, layer="L"), x)
    ref = static_reference(ckpt, x) if mode == "static" else dynamic_reference(ckpt, x)
    assert rel_err(y, ref) < output_tolerance(dtype, EXACT)


def test_default_mode_is_dynamic_and_picks_each_paths_cpu_kernel():
    ckpt = mix_checkpoint(64, 48)
    assert quant_core.get_scheme("W8A8_MIX", "linear").mode == "dynamic"
    dynamic = quant_core.get_scheme("W8A8_MIX", "linear").process_weights(ckpt)
    static = quant_core.get_scheme("W8A8_MIX", "linear", mode="static").process_weights(ckpt)
    assert (dynamic.kernel.name, static.kernel.name) == ("cpu-fbgemm-int8-dynamic", "cpu-fbgemm-int8-static")
    assert "deq_scale" not in dynamic and "scaled_quant_bias" in static


def test_only_the_dynamic_path_adds_the_float_bias(backend):
    ckpt, x, bias = mix_checkpoint(64, 48), make_input((3,), 64, torch.float32), torch.full((48,), 100.0)
    for mode, added in (("static", False), ("dynamic", True)):
        scheme = quant_core.get_scheme("W8A8_MIX", "linear", backend=backend, mode=mode)
        runtime = scheme.process_weights(ckpt)
        diff = scheme.apply(runtime, x, bias) - scheme.apply(runtime, x)
        assert torch.allclose(diff, bias if added else torch.zeros(48), atol=1e-3), mode


@pytest.mark.parametrize(
    ("mode", "ops"),
    [
        ("static", ["npu_format_cast", "npu_quantize", "npu_quant_matmul"]),
        ("dynamic", ["npu_format_cast", "npu_dynamic_quant", "npu_quant_matmul"]),
    ],
)
def test_npu_path_calls_the_upstream_ops(npu, mode, ops):
    scheme = quant_core.get_scheme("W8A8_MIX", "linear", backend="npu", mode=mode)
    runtime = scheme.process_weights(mix_checkpoint(64, 48))
    assert runtime["weight"].shape == (64, 48)
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    assert npu == ops


@pytest.mark.parametrize(("k", "n"), [(576, 96), (96, 33)])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantize_process_apply_round_trip(k, n, backend_name, mode):
    # Static: ≈1.1 % (see test_w8a8.py); dynamic: ≈1 % (see test_w8a8_dynamic.py), on every backend. Both fold/add
    # the float bias so apply(x, bias) ≈ x Wᵀ + bias either way. 3e-2 bounds them with margin.
    scheme = quant_core.get_scheme("W8A8_MIX", "linear", backend=backend_name, mode=mode)
    weight, x, bias = make_weight(n, k), make_input((16,), k, torch.float32), torch.randn(n) * 0.5
    tensors = scheme.quantize_weights(weight, bias, act_min=x.min().item(), act_max=x.max().item())
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].dtype == tensors["weight_offset"].dtype == torch.float32
    assert not tensors["weight_offset"].any()
    y = scheme.apply(scheme.process_weights(tensors), x, bias)
    assert rel_err(y, x.double() @ weight.double().T + bias.double()) < 3e-2


def test_quantize_weights_writes_consistent_scales():
    weight = make_weight(48, 64).half()
    tensors = quant_core.get_scheme("W8A8_MIX", "linear").quantize_weights(weight, input_scale=0.03)
    assert tensors["deq_scale"].dtype == torch.int64  # fp16 model
    deq = (tensors["deq_scale"] & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    assert torch.allclose(deq, 0.03 * tensors["weight_scale"].flatten(), rtol=1e-6)


def test_quantize_weights_needs_calibration():
    with pytest.raises(CheckpointTensorError, match="needs the activation range"):
        quant_core.get_scheme("W8A8_MIX", "linear").quantize_weights(make_weight(8, 16))


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match=r"mode must be 'dynamic'.*got 'decode'"):
        quant_core.get_scheme("W8A8_MIX", "linear", mode="decode")
    with pytest.raises(UnsupportedSchemeError, match="does not take these options: mode"):
        quant_core.get_scheme("W8A8", "linear", mode="static")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (lambda c: c.pop("quant_bias"), r"'L' is missing L\.quant_bias"),
        (lambda c: c["weight_scale"].__setitem__((2, 0), float("nan")), r"'L\.weight_scale' contains NaN"),
        (lambda c: c["weight_scale"].__setitem__((2, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative"),
        (lambda c: c["weight_offset"].__setitem__((0, 0), 1.0), r"L\.weight_offset is non-zero"),
        (lambda c: c["deq_scale"].__setitem__(4, -1.0), r"'L\.deq_scale' has 1 zero or negative"),
        (lambda c: c.update(deq_scale=encode_int64(torch.full((48,), float("inf")))), r"'L\.deq_scale' contains"),
        (lambda c: c["input_scale"].__setitem__(0, float("nan")), r"'L\.input_scale' contains NaN"),
        (lambda c: c["input_offset"].__setitem__(0, -2.5), r"L\.input_offset is \[-2\.5\], expected an integer"),
        (lambda c: c.update(quant_bias=c["quant_bias"].float()), r"'L\.quant_bias' has dtype torch\.float32"),
    ],
)
def test_bad_checkpoint_tensors_are_named_in_both_modes(mode, change, match):
    ckpt = mix_checkpoint(64, 48)
    change(ckpt)
    scheme = quant_core.get_scheme("W8A8_MIX", "linear", mode=mode)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.process_weights(ckpt, layer="L")
