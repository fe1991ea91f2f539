import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, SHAPES, make_input, make_weight, output_tolerance, rel_err
from tie_reference import excess_err

import quant_core
from quant_core import CheckpointTensorError

# Beyond the near-tie slack below, backends differ from the float64 reference only by float32 rounding of s_tok,
# of the epilogue and of the sums (≈ 1e-7 · √K); 1e-5 is far above that, and far below a real mistake (a wrong
# qmax or a missing scale is ≥ 1e-1).
EXACT = 1e-5
TIE = 1e-6  # relative window around an E4M3 rounding boundary where float32 and float64 may round differently


def checkpoint(k: int, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A v1 checkpoint as msModelSlim writes it: E4M3 weight (values across binades, some at ±448), float32 [N,1]
    scale, zero offset."""
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
        "weight_scale": torch.rand(n, 1, generator=g) * 1e-3 + 1e-4,
        "weight_offset": torch.zeros(n, 1),
    }


def fp8(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-448, 448).to(torch.float8_e4m3fn).double()


def reference(ckpt, x, bias=None):
    """float64 spec: s = amax|x| / 448 per token, x_q = E4M3(x / s) (nearest even), y = s·s_w·(x_q @ W_qᵀ) + bias;
    and, per output, the most one-step flips of near-tie elements (|x/s| within TIE of a boundary) can move it."""
    x = x.double().reshape(-1, x.shape[-1])
    s = x.abs().amax(dim=-1, keepdim=True) / 448
    v = x / torch.where(s > 0, s, torch.ones_like(s))
    xq = fp8(v)
    flip = (fp8(v * (1 + TIE)) - fp8(v * (1 - TIE))).abs() * s  # ≠ 0 only next to a rounding boundary
    w = ckpt["weight"].double() * ckpt["weight_scale"].double()
    y = (xq * s) @ w.T
    return (y if bias is None else y + bias.double()), flip @ w.abs().T


@pytest.mark.parametrize("quant_type", ["WFP8AFP8_DYNAMIC", "W8A8FP8_DYNAMIC"])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, quant_type, k, n, batch, dtype):
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend, version="1.0.0")
    ckpt = checkpoint(k, n)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = scheme.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    ref, slack = reference(ckpt, x, bias)
    err, bound = excess_err(y.reshape(-1, n), ref, slack), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


def test_npu_path_calls_the_upstream_ops(npu):
    scheme = quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear", backend="npu")
    runtime = scheme.process_weights(checkpoint(64, 48))
    assert runtime["weight"].shape == (64, 48) and runtime["weight"].dtype == torch.float8_e4m3fn  # [K, N]
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16), torch.ones(48))
    assert npu == ["npu_dynamic_quant", "npu_quant_matmul"]


def test_alias_is_the_same_scheme_under_upstream_name():
    fp8_types = [q for q, _ in quant_core.supported_schemes("linear") if "FP8_DYNAMIC" in q]
    assert fp8_types == ["W8A8FP8_DYNAMIC", "WFP8AFP8_DYNAMIC"]
    a, b = (quant_core.get_scheme(q, "linear", backend="reference") for q in fp8_types)
    assert (a.quant_type, b.quant_type) == ("W8A8FP8_DYNAMIC", "WFP8AFP8_DYNAMIC")
    ckpt, x = checkpoint(96, 33), make_input((4,), 96, torch.float32)
    assert torch.equal(a.apply(a.process_weights(ckpt), x), b.apply(b.process_weights(ckpt), x))


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # E4M3 per-channel weights (≈ 2.5 % rms error, test_quantize.py) and E4M3 per-token activations (≈ 2.5 %) add in
    # quadrature to ≈ 3.5 % (measured 3.3-3.9 %); 6e-2 bounds that, while a wrong scale axis or qmax gives ≥ 50 %.
    scheme = quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear", backend=backend_name)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight)
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].dtype == tensors["weight_offset"].dtype == torch.float32  # v1 layout
    assert not tensors["weight_offset"].any()
    x = make_input((16,), k, torch.float32)
    y = scheme.apply(scheme.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < 6e-2


def test_quantize_weights_follows_msmodelslim():
    # msModelSlim 26.1.0 (ir/api/impl/fp_quantization.py): s = max(amax_row, 1e-12) / 448 and E4M3(clamp(w / s)),
    # both in the model dtype (bf16 here: the scale itself is a bf16 value); an all-zero row keeps a positive scale.
    w = torch.zeros(2, 64, dtype=torch.bfloat16)
    w[0, :3] = torch.tensor([0.3, -0.1, 0.0123])
    t = quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear").quantize_weights(w)
    s = (torch.tensor(0.3, dtype=torch.bfloat16) / 448).float().item()
    assert t["weight_scale"][0, 0].item() == s
    assert t["weight_scale"][1, 0].item() == (torch.tensor(1e-12, dtype=torch.bfloat16) / 448).float().item()
    assert t["weight"][0, 0].float().item() == 448.0
    assert t["weight"][0, :3].float().tolist() == [fp8((w[0, i] / torch.tensor(s).bfloat16()).double()).item()
                                                  for i in range(3)]  # fmt: skip
    assert not t["weight"][1].float().any()


def test_zero_rows_give_zero_output(backend):
    scheme = quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear", backend=backend)
    y = scheme.apply(scheme.process_weights(checkpoint(64, 48)), torch.zeros(3, 64))
    assert torch.equal(y, torch.zeros(3, 48))


def test_v0_style_scales_in_model_dtype_are_accepted():
    ckpt = checkpoint(64, 48)
    bf16 = dict(ckpt, weight_scale=ckpt["weight_scale"].bfloat16(), weight_offset=ckpt["weight_offset"].bfloat16())
    scheme = quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear", backend="reference")
    x = make_input((4,), 64, torch.float32)
    ref, slack = reference(dict(ckpt, weight_scale=bf16["weight_scale"].float()), x)
    assert excess_err(scheme.apply(scheme.process_weights(bf16), x), ref, slack) < EXACT


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].view(torch.int8)),
         r"'L\.weight' has dtype torch\.int8, expected torch\.float8"),
        (lambda c: c.update(weight_scale=torch.ones(48)), r"'L\.weight_scale' has shape \(48,\), expected \(48, 1\)"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative scale"),
        (lambda c: c["weight_scale"].__setitem__((3, 0), float("inf")), r"'L\.weight_scale' contains NaN or Inf"),
        (lambda c: c["weight_offset"].__setitem__((0, 0), 1.0), r"L\.weight_offset is non-zero, but FP8 weights"),
        (lambda c: c["weight"].view(torch.uint8).__setitem__((1, 1), 0xFF), r"L\.weight holds 1 FP8 NaN"),
        (lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (lambda c: c.update(deq_scale=torch.ones(48)), r"does not use: L\.deq_scale"),
    ],
)  # fmt: skip
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(64, 48)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear").process_weights(ckpt, layer="L")


def test_auto_prefers_the_cpu_kernel():
    runtime = quant_core.get_scheme("WFP8AFP8_DYNAMIC", "linear").process_weights(checkpoint(64, 48))
    assert runtime.kernel.name == "cpu-fp8-dequantized-fp32"
