import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, make_input, make_weight, output_tolerance, rel_err
from mx_cases import MX_SHAPES, checkpoint, e8m0, reference, weight_values

import quant_core
from quant_core import CheckpointTensorError, DescriptionError
from quant_core.kernels import KernelUnavailableError

QT, ELEMENT = "W8A8_MXFP8", "fp8"
# MX scaling is by powers of two, so every backend forms the very same E4M3 elements as the float64 reference and
# their products are exact in float32: what remains is float32 summation (≈ 1e-7 · √K relative). 1e-5 is far above
# that and far below any real mistake (one exponent off by one in one block moves an output by ≥ 1e-2).
EXACT = 1e-5


def scheme(backend="reference", **options):
    return quant_core.get_scheme(QT, "linear", backend=backend, version="1.0.0", **options)


@pytest.mark.parametrize(("k", "n"), MX_SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, k, n, batch, dtype):
    s = scheme(backend, group_size=32)
    ckpt = checkpoint(k, n, ELEMENT)
    if backend == "npu" and k % 64:
        with pytest.raises(KernelUnavailableError, match=f"K={k} is not a multiple of 64"):
            s.process_weights(ckpt, layer="L")
        return
    runtime = s.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype) * 3
    bias = torch.randn(n).to(dtype)
    y = s.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    err, bound = rel_err(y, reference(ckpt, x, ELEMENT, bias)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


def test_npu_path_calls_the_upstream_ops(npu):
    s = scheme("npu")
    runtime = s.process_weights(checkpoint(128, 48, ELEMENT))
    assert runtime["weight"].shape == (128, 48)  # [K, N]
    assert runtime["weight_scale"].shape == (2, 48, 2)  # [K/64, N, 2]
    s.apply(runtime, make_input((3,), 128, torch.bfloat16))
    assert npu == ["npu_dynamic_mx_quant", "npu_quant_matmul"]


def test_activations_use_the_ocp_exponent_and_round_to_nearest_even():
    # One block, amax 300 = 1.17 · 2^8: e = floor(log2 300) - 8 = 0, so the elements are the values themselves on the
    # E4M3 grid (step 32 in [256, 512), 0.125 in [1, 2), subnormal step 2^-9): 300 -> 288 (nearest), 1.0625 -> 1.0
    # and 1.1875 -> 1.25 (ties: to the even mantissa), -0.001 -> -2^-9. A one-hot weight reads them out.
    ckpt = {
        "weight": torch.eye(32).to(torch.float8_e4m3fn),
        "weight_scale": torch.full((32, 1), 127, dtype=torch.uint8),
    }
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([300.0, 1.0625, 1.1875, -0.001])
    for backend in ("reference", "cpu"):
        y = scheme(backend).apply(scheme(backend).process_weights(ckpt), x)
        assert y[0, :4].tolist() == [288.0, 1.0, 1.25, -(2.0**-9)]
    x[0, 5] = 500.0  # now amax 500: still e = 0, and 500 saturates to 448
    assert scheme().apply(scheme().process_weights(ckpt), x)[0, 5].item() == 448.0


@pytest.mark.parametrize(("k", "n"), MX_SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # E4M3 weights per 32-block (≈ 3 % rms error, see test_quantize.py) and E4M3 activations (≈ 3 %) add in
    # quadrature to ≈ 4.2 % (measured 4.1-4.5 %); 6e-2 bounds that, while a wrong exponent bias or element decoding
    # gives ≥ 50 %.
    s = scheme(backend_name)
    weight = make_weight(n, k)
    tensors = s.quantize_weights(weight)
    specs = s.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs) == {"weight", "weight_scale"}
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].shape == (n, -(-k // 32))
    x = make_input((16,), k, torch.float32)
    y = s.apply(s.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < 6e-2


def test_quantize_weights_follows_msmodelslim():
    # msModelSlim 26.1.0 (ir/api/impl/mx_quantization.py): e = floor(log2 amax) - 8 per 32-block; elements round half
    # AWAY from zero (not to even). Block 0: amax 1.5 -> e = -8, so 1.0625 (a tie between 1.0 and 1.125) -> 1.125.
    # Block 1: amax 2^-20 (tiny) -> e = -28. The compat harness checks the rest bit for bit on real output.
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 1], w[0, 2] = 1.5, 1.0625, -1.0625
    w[1, 32] = 2.0**-20
    t = scheme().quantize_weights(w.bfloat16())
    assert t["weight_scale"].tolist() == [[127 - 8, 0], [0, 127 - 28]]  # all-zero blocks: e = -127, code 0
    values = weight_values(t, ELEMENT)
    assert values[0, :3].tolist() == [1.5, 1.125, -1.125] and values[1, 32].item() == 2.0**-20
    assert t["weight"].dtype == torch.float8_e4m3fn


def test_quantize_weights_works_in_the_model_dtype():
    # msModelSlim takes log2 of the block amax in the model dtype. A bf16 amax of 1.9921875 · 2^-4 has log2 -3.0056,
    # which bf16 rounds to -3.0: the exponent is one higher than from float32 (-4 - 8 = -12 vs -3 - 8 = -11).
    w = torch.full((1, 32), 1.9921875 * 2**-4)
    assert scheme().quantize_weights(w)["weight_scale"].item() == 127 - 12
    assert scheme().quantize_weights(w.bfloat16())["weight_scale"].item() == 127 - 11


def test_zero_rows_give_zero_output(backend):
    s = scheme(backend)
    y = s.apply(s.process_weights(checkpoint(64, 48, ELEMENT)), torch.zeros(3, 64))
    assert torch.equal(y, torch.zeros(3, 48))


def test_e8m0_exponents_decode_to_powers_of_two():
    # weight 1.0 everywhere, one block per row, codes from the bottom to the top of the E8M0 range
    codes = torch.tensor([[0], [1], [126], [127], [128], [254]], dtype=torch.uint8)
    assert e8m0(codes).flatten().tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    ckpt = {"weight": torch.ones(6, 32).to(torch.float8_e4m3fn), "weight_scale": codes}
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    y = scheme().apply(scheme().process_weights(ckpt), x)
    assert y.double().flatten().tolist() == e8m0(codes).flatten().tolist()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].view(torch.int8)), r"'L\.weight' has dtype torch\.int8, expected"),
        (lambda c: c.update(weight_scale=c["weight_scale"].float()),
         r"'L\.weight_scale' has dtype torch\.float32, expected torch\.uint8"),
        (lambda c: c.update(weight_scale=c["weight_scale"][:, :1]), r"'L\.weight_scale' has shape \(48, 1\), expected"),
        (lambda c: c["weight_scale"].__setitem__((4, 1), 255), r"L\.weight_scale has 1 E8M0 NaN code"),
        (lambda c: c["weight"].view(torch.uint8).__setitem__((2, 3), 0x7F), r"L\.weight holds 1 FP8 NaN"),
        (lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (lambda c: c.update(weight_offset=torch.zeros(48, 1)), r"does not use: L\.weight_offset"),
    ],
)  # fmt: skip
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(64, 48, ELEMENT)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme().process_weights(ckpt, layer="L")


def test_group_size_other_than_32_is_refused():
    scheme(group_size=0)  # absent from the description: fine
    with pytest.raises(DescriptionError, match="blocks of 32 along K, but the description's group_size is 64"):
        scheme(group_size=64)


def test_auto_prefers_the_cpu_kernel_and_apply_checks_the_width():
    s = quant_core.get_scheme(QT, "linear")
    runtime = s.process_weights(checkpoint(64, 48, ELEMENT))
    assert runtime.kernel.name == "cpu-mx-dequantized-fp32"
    with pytest.raises(ValueError, match="last dim 64"):
        s.apply(runtime, torch.randn(2, 65))


def test_quantizer_writes_group_size_32_and_refuses_conflicting_group_sizes(tmp_path):
    pytest.importorskip("transformers")
    from quant_core import QuantDescription
    from quant_core.errors import QuantCoreError
    from quant_core.quantize import quantize_model
    from quant_core.tiny_models import make_tiny_model

    source = make_tiny_model("qwen3", tmp_path / "m")
    out = quantize_model(source, tmp_path / "mx", "W8A8_DYNAMIC", layer_schemes=["*.mlp.*=W8A8_MXFP8"],
                         progress=False).out_dir  # fmt: skip
    desc = QuantDescription.from_checkpoint(out)
    assert desc.group_size == 32 and desc.model_quant_type == "W8A8_MXFP8"  # as msModelSlim writes MX checkpoints
    assert quantize_model(source, tmp_path / "g32", QT, group_size=32, progress=False).out_dir.is_dir()
    with pytest.raises(QuantCoreError, match=r"--group-size 64: W8A8_MXFP8 layers .* use blocks of 32"):
        quantize_model(source, tmp_path / "g64", QT, group_size=64, progress=False)
    with pytest.raises(QuantCoreError, match=r"W4A16 layers .* would read as their own group size"):
        quantize_model(source, tmp_path / "mixed", QT, layer_schemes=["*.mlp.*=W4A16"], progress=False)
    assert not (tmp_path / "g64").exists() and not (tmp_path / "mixed").exists()
