import pytest
import torch
from fbgemm_isa import run_with_fbgemm_isa
from linear_cases import (
    ACT_DTYPES,
    BATCH_SHAPES,
    SHAPES,
    fake_quant_per_token,
    make_input,
    make_weight,
    output_tolerance,
    rel_err,
)

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError
from quant_core.kernels.int8_dynamic import fbgemm_saturates

# Every backend (cpu's fbgemm included: it feeds the spec's own int8 codes through an exact split) reproduces the
# spec's integer arithmetic; the only differences from the float64 reference are float32 epilogue rounding (~1e-7,
# measured ≤ 6.5e-8 on both reference and cpu) and, rarely, a one-LSB flip of x_q where x / s sits on a rounding
# tie in one precision but not the other (≤ 1/127 of one term). 1e-4 leaves room for that and catches any real
# mistake (a wrong scale axis or a missing term is ≥ 1e-1; the old 7-bit activation grid was 1.5e-2).
EXACT = 1e-4
# cpu vs reference kernel on the same float32 input: identical codes and int32 sums, the float32 epilogue differs
# only in the order of its 2-3 roundings (a few 2^-24 of the largest output in a row). Measured ≤ 6.8e-8.
CPU_VS_REFERENCE = 1e-6


def checkpoint(k: int, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A v1 checkpoint as msModelSlim writes it: int8 weight, float32 [N,1] scale, zero offset."""
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8),
        "weight_scale": torch.rand(n, 1, generator=g) * 1e-2 + 1e-3,
        "weight_offset": torch.zeros(n, 1),
    }


def reference(ckpt, x, bias=None, act_quant=True):
    w = ckpt["weight"].double() * ckpt["weight_scale"].double()
    xq = fake_quant_per_token(x, 127) if act_quant else x.double()
    y = xq @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend=backend, version="1.0.0", group_size=0)
    ckpt = checkpoint(k, n)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = scheme.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    err, bound = rel_err(y, reference(ckpt, x, bias)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"


def test_npu_path_calls_the_upstream_ops(npu):
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="npu")
    runtime = scheme.process_weights(checkpoint(64, 48))
    assert runtime["weight"].shape == (64, 48)  # [K, N] as npu_quant_matmul wants it
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    assert npu == ["npu_format_cast", "npu_dynamic_quant", "npu_quant_matmul"]


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # Per-channel int8 weights (≈0.7 % rms error for Gaussian rows) plus per-token int8 activations (≈0.7 %, on
    # every backend) add to ≈1 %; 3e-2 bounds it with margin.
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend=backend_name)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight)
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].dtype == torch.float32  # v1 layout
    x = make_input((16,), k, torch.float32)
    y = scheme.apply(scheme.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < 3e-2


def test_v0_scales_in_model_dtype_are_accepted():
    ckpt = checkpoint(64, 48)
    v0 = dict(ckpt, weight_scale=ckpt["weight_scale"].bfloat16(), weight_offset=ckpt["weight_offset"].bfloat16())
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="reference")
    x = make_input((4,), 64, torch.float32)
    y = scheme.apply(scheme.process_weights(v0), x)
    ckpt_rounded = dict(ckpt, weight_scale=v0["weight_scale"].float())
    assert rel_err(y, reference(ckpt_rounded, x)) < EXACT


def test_weight_offset_is_optional():
    ckpt = checkpoint(64, 48)
    del ckpt["weight_offset"]
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="reference")
    scheme.process_weights(ckpt)


def test_zero_rows_give_zero_output(backend):
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend=backend)
    runtime = scheme.process_weights(checkpoint(64, 48))
    y = scheme.apply(runtime, torch.zeros(3, 64))
    assert torch.equal(y, torch.zeros(3, 48))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].float()), r"'L\.weight' has dtype torch\.float32, expected torch\.int8"),
        (lambda c: c.update(weight_scale=torch.ones(48)), r"'L\.weight_scale' has shape \(48,\), expected \(48, 1\)"),
        (lambda c: c["weight_scale"].__setitem__((3, 0), float("nan")), r"'L\.weight_scale' contains NaN or Inf"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative scale"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), -1.0), r"zero or negative"),
        (lambda c: c["weight_offset"].__setitem__((0, 0), 2.0), r"L\.weight_offset is non-zero"),
        (lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (lambda c: c.update(deq_scale=torch.ones(48)), r"does not use: L\.deq_scale"),
        (lambda c: c.update(weight=c["weight"][None]), r"weight must be 2-D"),
    ],
)
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(64, 48)
    change(ckpt)
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear")
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.process_weights(ckpt, layer="L")


def test_apply_rejects_wrong_input_width_and_plain_dicts():
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="reference")
    runtime = scheme.process_weights(checkpoint(64, 48))
    with pytest.raises(ValueError, match="last dim 64"):
        scheme.apply(runtime, torch.randn(2, 65))
    with pytest.raises(TypeError, match="needs the Runtime"):
        scheme.apply(dict(runtime), torch.randn(2, 64))


def test_chooser_explains_an_impossible_backend():
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="npu")
    with pytest.raises(KernelUnavailableError, match="npu-int8-dynamic: torch_npu is not installed"):
        scheme.process_weights(checkpoint(64, 48))


def test_auto_prefers_the_fast_cpu_kernel():
    runtime = quant_core.get_scheme("W8A8_DYNAMIC", "linear").process_weights(checkpoint(64, 48))
    assert runtime.kernel.name == "cpu-fbgemm-int8-dynamic"


@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_cpu_kernel_equals_the_reference_kernel(k, n):
    ckpt, x, bias = checkpoint(k, n), make_input((9,), k, torch.float32), torch.randn(n)
    outs = {}
    for backend in ("cpu", "reference"):
        scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend=backend)
        outs[backend] = scheme.apply(scheme.process_weights(ckpt), x, bias)
    assert rel_err(outs["cpu"], outs["reference"]) < CPU_VS_REFERENCE


def test_cpu_kernel_is_batch_invariant():
    # Per-token quantization gives a row the same result whatever else is in the batch (vLLM batches rows
    # differently from a plain forward): the fbgemm kernel takes the per-token codes with fixed quantization
    # parameters, so a row with a huge outlier cannot coarsen its neighbours' grid. Bitwise equality.
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="cpu")
    runtime = scheme.process_weights(checkpoint(96, 48))
    x = make_input((6,), 96, torch.float32) * torch.tensor([0.1, 1.0, 10.0, 3.0, 0.5, 1.0])[:, None]
    x[5, 7] = 1e4
    batched = scheme.apply(runtime, x)
    one_by_one = torch.cat([scheme.apply(runtime, row[None]) for row in x])
    assert torch.equal(batched, one_by_one)
    assert torch.equal(scheme.apply(runtime, x[:5]), batched[:5])


def saturating_case() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Weights at ±127 (and -128) against activation rows whose codes reach ±127: as u8 ``q + 128`` they make
    full-range u8 × s8 pairs, whose sums overflow int16 in AVX2's ``vpmaddubsw`` (cpu-kernels.md §4)."""
    k, n = 256, 8
    g = torch.Generator().manual_seed(4)
    alternating = torch.where(torch.arange(k) % 2 == 0, 127, -127)
    random_signs = torch.where(torch.rand(4, k, generator=g) < 0.5, 127, -127)
    rows = [torch.full((k,), 127), torch.full((k,), -127), torch.full((k,), -128), alternating, *random_signs]
    ckpt = dict(checkpoint(k, n), weight=torch.stack(rows).to(torch.int8))
    x = torch.stack([
        torch.full((k,), 3.0),  # every code +127
        torch.full((k,), -3.0),  # every code -127
        (alternating / 127) * 2.0,  # ±127, in phase with the alternating weight row
        torch.randn(k, generator=g).abs() + 1.0,  # all positive, codes 40..127
        torch.randn(k, generator=g),  # Gaussian ...
    ])  # fmt: skip
    x[4, 11] = 1e4  # ... with a huge outlier: its code is 127, every other code is 0 (u8 128 next to 255)
    return ckpt, x


def check_saturating_case(expect_single_pass_saturates: bool = False) -> None:
    """cpu equals the reference kernel (and the float64 spec) on :func:`saturating_case`. With
    ``expect_single_pass_saturates`` also show that the input is adversarial: one plain 8-bit fbgemm pass is wrong."""
    ckpt, x = saturating_case()
    outs, runtimes = {}, {}
    for backend in ("cpu", "reference"):
        scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend=backend)
        runtimes[backend] = scheme.process_weights(ckpt)
        outs[backend] = scheme.apply(runtimes[backend], x)
    assert runtimes["cpu"].kernel.name == "cpu-fbgemm-int8-dynamic"
    spec = reference(ckpt, x)
    # same codes and int32 sums; float32 epilogue rounding only (a few 2^-24 of the largest output)
    atol = 1e-6 * outs["reference"].abs().max().item()
    torch.testing.assert_close(outs["cpu"], outs["reference"], rtol=1e-6, atol=atol)
    assert rel_err(outs["cpu"], spec) < EXACT
    if expect_single_pass_saturates:
        s_tok = x.double().abs().amax(-1, keepdim=True) / 127
        codes = torch.round(x.double() / s_tok).float()
        single_pass = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes, 1.0, 128, runtimes["cpu"]["packed_weight"]
        )
        assert rel_err(single_pass * s_tok, spec) > 0.1  # measured 0.85 on AVX2: int16 saturation
        assert fbgemm_saturates()  # ... and the kernel's probe sees it, so it takes the split path


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_cpu_kernel_is_exact_where_u8_s8_pairs_saturate(isa):
    # native: whatever this CPU has (VNNI CPUs never saturate, and the kernel's probe then picks one 8-bit pass);
    # AVX2: fbgemm forced onto vpmaddubsw, where a single 8-bit pass is off by 85 % here, so the exact split is what
    # keeps the cpu kernel equal to the reference.
    if isa == "native":
        check_saturating_case()
    else:
        run_with_fbgemm_isa(isa, "test_w8a8_dynamic", "check_saturating_case", expect_single_pass_saturates=True)
