import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, make_input, make_weight, output_tolerance, rel_err
from mx_cases import MX_SHAPES, checkpoint, fp4_decode, fp4_pack, fp4_unpack, reference, weight_values

import quant_core
from quant_core import CheckpointTensorError
from quant_core.float_formats import pack_fp4, unpack_fp4
from quant_core.kernels import KernelUnavailableError

QT, ELEMENT = "W4A4_MXFP4", "fp4"
# As for MXFP8 (test_mxfp8.py): power-of-two scales make every backend's E2M1 elements identical to the float64
# reference's, and their products are exact in float32; only float32 summation (≈ 1e-7 · √K) remains.
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
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = s.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    err, bound = rel_err(y, reference(ckpt, x, ELEMENT, bias)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


def test_npu_path_calls_the_upstream_ops(npu):
    s = scheme("npu")
    runtime = s.process_weights(checkpoint(128, 48, ELEMENT))
    assert runtime["weight"].shape == (64, 48)  # [K/2, N]: a transposed view, still packed along K
    assert runtime["weight_scale"].shape == (2, 48, 2)  # [K/64, N, 2]
    s.apply(runtime, make_input((3,), 128, torch.bfloat16))
    assert npu == ["npu_dynamic_mx_quant", "npu_quant_matmul"]


def test_nibble_order_low_first():
    # Element 2j in the low nibble (msModelSlim's pack_fp4_to_uint8; verified on its output, modelslim-tool §4.13).
    codes = torch.tensor([[1, 2, 15, 8]])
    assert fp4_pack(codes).tolist() == [[0x21, 0x8F]]
    assert pack_fp4(codes).tolist() == [[0x21, 0x8F]] and unpack_fp4(pack_fp4(codes)).tolist() == codes.tolist()
    assert fp4_decode(fp4_unpack(fp4_pack(codes))).tolist() == [[0.5, 1.0, -6.0, -0.0]]
    # and the scheme reads it that way: a weight whose row holds codes (1, 2) in block 0 at scale 2^0
    ckpt = {"weight": torch.zeros(1, 16, dtype=torch.uint8), "weight_scale": torch.full((1, 1), 127, dtype=torch.uint8)}
    ckpt["weight"][0, 0] = 0x21
    x = torch.zeros(2, 32)
    x[0, 0], x[1, 1] = 4.0, 4.0  # one-hot rows: amax 4 -> e = 0, elements exact
    y = scheme().apply(scheme().process_weights(ckpt), x)
    assert y[:, 0].tolist() == [2.0, 4.0]  # 4 · 0.5 and 4 · 1.0


def test_activations_use_the_ocp_exponent_and_round_to_nearest_even():
    # One block with amax 7.5: e = floor(log2 7.5) - 2 = 0, so 7.5 saturates to 6; 2.5 -> 2 and 0.25 -> 0 (ties to
    # the even code), 0.75 -> 1 (tie), 5 -> 4 (tie), 3.4 -> 3 (nearest). A one-hot weight reads them out.
    one_hot = fp4_pack(torch.eye(32, dtype=torch.int64) * 2)  # code 2 = 1.0 on the diagonal
    ckpt = {"weight": one_hot, "weight_scale": torch.full((32, 1), 127, dtype=torch.uint8)}
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([7.5, 2.5, -0.25, 0.75, 5.0, 3.4])
    for backend in ("reference", "cpu"):
        y = scheme(backend).apply(scheme(backend).process_weights(ckpt), x)
        assert y[0, :6].tolist() == [6.0, 2.0, -0.0, 1.0, 4.0, 3.0]


@pytest.mark.parametrize(("k", "n"), MX_SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # E2M1 per 32-block: ≈ 11 % rms error on the weights (test_quantize.py) and about as much on the activations add
    # in quadrature to ≈ 16 % (measured 15.6-16.7 %). 0.25 bounds that; a wrong nibble order gives ≈ 140 %.
    s = scheme(backend_name)
    weight = make_weight(n, k)
    tensors = s.quantize_weights(weight)
    specs = s.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs) == {"weight", "weight_scale"}
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight"].shape == (n, k // 2) and tensors["weight_scale"].shape == (n, -(-k // 32))
    x = make_input((16,), k, torch.float32)
    y = s.apply(s.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < 0.25


def test_quantize_weights_follows_msmodelslim():
    # msModelSlim 26.1.0: e = floor(log2(amax · 8/7 + 9.6e-7)) - 2 (OCP would take floor(log2 amax) - 2), elements
    # rounded half AWAY from zero, a small negative weight stored as -0 (code 8).
    # Block 0: amax 7.5 -> log2(8.57) = 3.1 -> e = 1 (OCP: 0, and 7.5 would clip at 6); 7.5 / 2 = 3.75 -> 4 (step 1),
    #          2.5 / 2 = 1.25 -> 1.5 (a tie, away from zero), -0.2 / 2 = -0.1 -> -0.
    # Block 1: amax 5.5 -> log2(6.29) = 2.65 -> e = 0 (as OCP): 5.5 -> 6, 0.25 -> 0.5 and 5 -> 6 (ties, away from 0).
    w = torch.zeros(1, 64)
    w[0, :3] = torch.tensor([7.5, 2.5, -0.2])
    w[0, 32:35] = torch.tensor([5.5, 0.25, 5.0])
    t = scheme().quantize_weights(w.bfloat16())
    assert t["weight_scale"].tolist() == [[128, 127]]
    codes = fp4_unpack(t["weight"])
    assert codes[0, :3].tolist() == [6, 3, 8] and codes[0, 32:35].tolist() == [7, 1, 7]
    assert weight_values(t, ELEMENT)[0, :3].tolist() == [8.0, 3.0, -0.0]


def test_zero_rows_give_zero_output(backend):
    s = scheme(backend)
    y = s.apply(s.process_weights(checkpoint(64, 48, ELEMENT)), torch.zeros(3, 64))
    assert torch.equal(y, torch.zeros(3, 48))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].view(torch.int8)), r"'L\.weight' has dtype .*int8, expected .*uint8"),
        # a weight [48, 64] reads as K = 128: the (48, 2) scale then has the wrong shape
        (lambda c: c.update(weight=torch.zeros(48, 64, dtype=torch.uint8)), r"'L\.weight_scale' has shape \(48, 2\)"),
        (lambda c: c.update(weight_scale=c["weight_scale"][:, :1]), r"'L\.weight_scale' has shape \(48, 1\), expected"),
        (lambda c: c["weight_scale"].__setitem__((0, 0), 255), r"L\.weight_scale has 1 E8M0 NaN code"),
        (lambda c: c.pop("weight"), r"layer 'L' has no 'weight' tensor"),
    ],
)  # fmt: skip
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(64, 48, ELEMENT)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme().process_weights(ckpt, layer="L")


def test_odd_in_features_cannot_be_packed():
    with pytest.raises(CheckpointTensorError, match="in_features must be even, got 33"):
        scheme().quantize_weights(torch.randn(8, 33))
    with pytest.raises(CheckpointTensorError, match="in_features must be even"):
        scheme().weight_specs(33, 8, torch.bfloat16)
