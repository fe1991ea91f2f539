import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, SHAPES, make_input, make_weight, output_tolerance, rel_err
from tie_reference import excess_err, fake_quant_with_ties, linear_with_slack

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError

# reference and cpu (fbgemm with its range pinned to the int4 grid) are exact integer arithmetic: beyond the
# near-tie slack (tie_reference.py) only float32 epilogue rounding (~1e-7) remains. 1e-4 catches any real mistake.
EXACT = 1e-4
# npu: upstream's npu_quant_matmul writes float16 (then casts), a relative rounding of ≤ 2^-11 ≈ 4.9e-4 per element.
NPU_FP16_OUT = 1e-3


def checkpoint(k: int, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A checkpoint as upstream describes it: int4 values one per int8 byte, float32 [N,1] scale, zero offset."""
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8),
        "weight_scale": torch.rand(n, 1, generator=g) * 1e-2 + 1e-3,
        "weight_offset": torch.zeros(n, 1),
    }


def reference(ckpt, x, bias=None):
    """float64 spec: s = amax|x|/7, q = clamp(round(x/s), -8, 7), y = q·s @ (W·s_w)ᵀ + bias (and the tie slack)."""
    w = ckpt["weight"].double() * ckpt["weight_scale"].double()
    xq, tie_s = fake_quant_with_ties(x, 7)
    return linear_with_slack(xq, tie_s, w, bias)


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend=backend, version="1.0.0")
    ckpt = checkpoint(k, n)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = scheme.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    ref, slack = reference(ckpt, x.reshape(-1, k), bias)
    bound = output_tolerance(dtype, NPU_FP16_OUT if backend == "npu" else EXACT)
    err = excess_err(y.reshape(-1, n), ref, slack)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


def test_cpu_kernel_is_exact_at_the_int4_extremes():
    # All activations at +7 or -8 against all-(+7 / -8) weights: the largest |products| the grid allows. fbgemm's
    # u8 x s8 pairs are 15·8·2 = 240 at most, far from the int16 saturation at 32767, so the result is exact.
    k, n = 256, 16
    ckpt = {"weight": torch.full((n, k), 7, dtype=torch.int8), "weight_scale": torch.full((n, 1), 0.5)}
    ckpt["weight"][n // 2 :] = -8
    x = torch.tensor([[7.0] * k, [-8.0] * k, [7.0, -8.0] * (k // 2)])
    schemes = {b: quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend=b) for b in ("cpu", "reference")}
    runtimes = {b: s.process_weights(ckpt) for b, s in schemes.items()}
    outs = {b: s.apply(runtimes[b], x) for b, s in schemes.items()}
    assert runtimes["cpu"].kernel.name == "cpu-fbgemm-int4-dynamic"
    assert torch.equal(outs["cpu"], outs["reference"])
    expected = (x.double() / (x.abs().amax(-1, keepdim=True) / 7)).round().clamp(-8, 7) @ ckpt["weight"].double().T
    expected *= x.abs().amax(-1, keepdim=True).double() / 7 * 0.5
    assert torch.allclose(outs["cpu"].double(), expected, rtol=1e-6)


def test_npu_path_calls_the_upstream_ops(npu):
    scheme = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend="npu")
    runtime = scheme.process_weights(checkpoint(64, 48))
    assert runtime["weight_packed"].shape == (48, 8) and runtime["weight_packed"].dtype == torch.int32  # [N, K/8]
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    assert npu == ["npu_convert_weight_to_int4pack", "npu_dynamic_quant", "npu_quant_matmul"]


def test_npu_needs_k_divisible_by_8(npu):
    scheme = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend="npu")
    with pytest.raises(KernelUnavailableError, match="K=60 is not a multiple of 8"):
        scheme.process_weights(checkpoint(60, 48))
    # reference and cpu do not pack along K
    x = make_input((2,), 60, torch.float32)
    for b in ("reference", "cpu"):
        s = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend=b)
        ref, slack = reference(checkpoint(60, 48), x)
        assert excess_err(s.apply(s.process_weights(checkpoint(60, 48)), x), ref, slack) < EXACT


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # int4 grids are coarse. Per-channel RTN weights: step = amax/7 with amax ≈ 2.5-3.2 σ for Gaussian rows of
    # K = 64..576, rms error step/√12 ≈ 10-13 % of σ (msModelSlim measured 12.6 %). Per-token int4 activations:
    # the same 10-13 %. Independent errors add in quadrature to ≈ 15-19 % of the output; 0.25 bounds it with margin
    # and still fails for any real bug (a wrong grid or scale axis gives ≥ 50 %).
    scheme = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend=backend_name)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight)
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].dtype == torch.float32 and int(tensors["weight"].abs().max()) <= 8
    x = make_input((16,), k, torch.float32)
    err = rel_err(scheme.apply(scheme.process_weights(tensors), x), x.double() @ weight.double().T)
    assert err < 0.25


def test_v0_scales_in_model_dtype_are_accepted():
    ckpt = checkpoint(64, 48)
    v0 = dict(ckpt, weight_scale=ckpt["weight_scale"].bfloat16(), weight_offset=ckpt["weight_offset"].bfloat16())
    scheme = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend="reference", version="0")
    x = make_input((4,), 64, torch.float32)
    ref, slack = reference(dict(ckpt, weight_scale=v0["weight_scale"].float()), x)
    assert excess_err(scheme.apply(scheme.process_weights(v0), x), ref, slack) < EXACT


def test_weight_offset_is_optional():
    ckpt = checkpoint(64, 48)
    del ckpt["weight_offset"]
    quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend="reference").process_weights(ckpt)


def test_zero_rows_give_zero_output(backend):
    scheme = quant_core.get_scheme("W4A4_DYNAMIC", "linear", backend=backend)
    y = scheme.apply(scheme.process_weights(checkpoint(64, 48)), torch.zeros(3, 64))
    assert torch.equal(y, torch.zeros(3, 48))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c["weight"].__setitem__((2, 3), 8), r"L\.weight holds values outside the int4 range \[-8, 7\]"),
        (lambda c: c["weight"].__setitem__((2, 3), -9), r"min -9, max"),
        (lambda c: c.update(weight=c["weight"].int()), r"'L\.weight' has dtype torch\.int32, expected torch\.int8"),
        (lambda c: c.update(weight=c["weight"][:24]), r"'L\.weight_scale' has shape \(48, 1\), expected \(24, 1\)"),
        (lambda c: c["weight_scale"].__setitem__((3, 0), float("inf")), r"'L\.weight_scale' contains NaN or Inf"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative scale"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), -1.0), r"zero or negative"),
        (lambda c: c["weight_offset"].__setitem__((0, 0), 1.0), r"L\.weight_offset is non-zero"),
        (lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (lambda c: c.pop("weight"), r"has no 'weight' tensor"),
        (lambda c: c.update(left_trans=torch.eye(8)), r"does not use: L\.left_trans"),
    ],
)
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(64, 48)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        quant_core.get_scheme("W4A4_DYNAMIC", "linear").process_weights(ckpt, layer="L")


def test_auto_prefers_the_exact_fbgemm_kernel():
    runtime = quant_core.get_scheme("W4A4_DYNAMIC", "linear").process_weights(checkpoint(64, 48))
    assert runtime.kernel.name == "cpu-fbgemm-int4-dynamic"
