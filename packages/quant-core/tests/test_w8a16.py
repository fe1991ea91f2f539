import pytest
import torch
from fbgemm_isa import run_with_fbgemm_isa
from linear_cases import ACT_DTYPES, BATCH_SHAPES, SHAPES, make_input, make_weight, output_tolerance, rel_err

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError
from quant_core.kernels.base import LinearKernelConfig
from quant_core.kernels.weight_only import Int8PackMM

# The reference backend dequantizes and multiplies in float32: against float64 only accumulation rounding
# (~1e-7 · √K) remains. 1e-5 catches any real mistake (a wrong offset sign or scale axis is ≥ 1e-1).
EXACT = 1e-5
# The int8pack cpu kernel and the npu kernel run in bf16: x (fp32 inputs), the npu's scales and the output are each
# rounded to bf16, a relative rms error of 2^-9/√3 ≈ 1.1e-3 apiece, ≈ 2e-3 together (measured: ≤ 2.5e-3). 1e-2 is 4x.
BF16_PATH = 1e-2
# The cpu default (fbgemm, activations as three int8 digits) leaves at most amax|x|·6.1e-8 per activation, fp32's own
# resolution: the float32 bound holds for it (measured ~1.4e-7 relative).
FLOAT_ACCURATE = ("reference-weight-only", "cpu-fbgemm-int8-digits")


def checkpoint(k: int, n: int, version: str = "1", seed: int = 1) -> dict[str, torch.Tensor]:
    """v1: symmetric, float32 scale, zero offset. v0: asymmetric, bf16 scale and non-zero integer offsets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    ckpt = {"weight": torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)}
    if version == "1":
        return ckpt | {"weight_scale": scale, "weight_offset": torch.zeros(n, 1)}
    offset = torch.randint(-40, 41, (n, 1), generator=g).float()
    return ckpt | {"weight_scale": scale.bfloat16(), "weight_offset": offset.bfloat16()}


def reference(ckpt, x, bias=None, sign=-1):
    """float64 ``x Wᵀ + b`` with ``W = (q - offset) · scale`` (``sign=+1``: the wrong, added offset)."""
    offset = ckpt.get("weight_offset", torch.zeros(1)).double()
    w = (ckpt["weight"].double() + sign * offset) * ckpt["weight_scale"].double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("version", ["1", "0"])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, version, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W8A16", "linear", backend=backend, version=version)
    ckpt = checkpoint(k, n, version)
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = scheme.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    bound = output_tolerance(dtype, EXACT) if runtime.kernel.name in FLOAT_ACCURATE else BF16_PATH
    err = rel_err(y, reference(ckpt, x, bias))
    assert err < bound, f"{backend}: rel err {err:.2e} ≥ {bound:.0e}"
    if version == "0":  # the offset sign matters: adding it (the npu op's convention, unnegated) fails
        assert rel_err(y, reference(ckpt, x, bias, sign=+1)) > 10 * bound


def test_npu_path_calls_the_upstream_ops(npu):
    scheme = quant_core.get_scheme("W8A16", "linear", backend="npu")
    ckpt = checkpoint(64, 48, version="0")
    runtime = scheme.process_weights(ckpt)
    assert runtime["weight"].shape == (64, 48)  # [K, N] as npu_weight_quant_batchmatmul wants it
    assert torch.equal(runtime["antiquant_offset"], -ckpt["weight_offset"].float().flatten())  # the op adds it
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    assert npu == ["npu_format_cast", "npu_weight_quant_batchmatmul"]


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, backend_name):
    # Symmetric per-channel int8: step amax/127 with amax ≈ 2.5-3.3 σ for Gaussian rows of 64-576, so the weight
    # error is step/√12 ≈ 0.6-0.75 % of rms, and so is the output's (measured 0.72 % at K=576); the cpu kernel's
    # bf16 adds ≈ 0.2 %. 2e-2 is over twice that.
    scheme = quant_core.get_scheme("W8A16", "linear", backend=backend_name)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight)
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].dtype == torch.float32 and not tensors["weight_offset"].any()  # v1 layout
    x = make_input((16,), k, torch.float32)
    y = scheme.apply(scheme.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < 2e-2


def test_weight_offset_is_optional_and_global_group_size_is_ignored():
    ckpt = checkpoint(64, 48)
    del ckpt["weight_offset"]
    scheme = quant_core.get_scheme("W8A16", "linear", backend="reference", group_size=32)
    x = make_input((4,), 64, torch.float32)
    assert rel_err(scheme.apply(scheme.process_weights(ckpt), x), reference(ckpt, x)) < EXACT


def test_zero_rows_give_zero_output(backend):
    scheme = quant_core.get_scheme("W8A16", "linear", backend=backend)
    runtime = scheme.process_weights(checkpoint(64, 48, version="0"))
    assert torch.equal(scheme.apply(runtime, torch.zeros(3, 64)), torch.zeros(3, 48))


def test_non_contiguous_fp16_input(backend):
    scheme = quant_core.get_scheme("W8A16", "linear", backend=backend)
    ckpt = checkpoint(64, 48, version="0")
    x = make_input((3,), 64, torch.float32).T.contiguous().T.half()  # a transposed view
    assert not x.is_contiguous()
    y = scheme.apply(scheme.process_weights(ckpt), x)
    assert y.dtype == torch.float16 and rel_err(y, reference(ckpt, x)) < BF16_PATH


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].float()), r"'L\.weight' has dtype torch\.float32, expected torch\.int8"),
        (lambda c: c.update(weight_scale=torch.ones(48)), r"'L\.weight_scale' has shape \(48,\), expected \(48, 1\)"),
        (lambda c: c["weight_scale"].__setitem__((3, 0), float("nan")), r"'L\.weight_scale' contains NaN or Inf"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative scale"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), -1.0), r"zero or negative"),
        (lambda c: c["weight_offset"].__setitem__((0, 0), float("inf")), r"'L\.weight_offset' contains NaN or Inf"),
        (lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (lambda c: c.update(deq_scale=torch.ones(48)), r"does not use: L\.deq_scale"),
        (lambda c: c.update(weight=c["weight"][None]), r"weight must be 2-D"),
    ],
)
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(64, 48)
    change(ckpt)
    scheme = quant_core.get_scheme("W8A16", "linear")
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.process_weights(ckpt, layer="L")


def test_chooser_explains_an_impossible_backend():
    scheme = quant_core.get_scheme("W8A16", "linear", backend="npu")
    with pytest.raises(KernelUnavailableError, match="npu-weight-quant-batchmatmul: torch_npu is not installed"):
        scheme.process_weights(checkpoint(64, 48))


def test_auto_prefers_the_fast_cpu_kernel():
    runtime = quant_core.get_scheme("W8A16", "linear").process_weights(checkpoint(96, 33, version="0"))
    assert runtime.kernel.name == "cpu-fbgemm-int8-digits"


@pytest.mark.parametrize("version", ["1", "0"])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_int8pack_kernel_where_fbgemm_is_absent(version, k, n):
    """The bf16 ``_weight_int8pack_mm`` kernel, next in line when fbgemm is not the quantized engine."""
    ckpt = checkpoint(k, n, version)
    canonical = quant_core.get_scheme("W8A16", "linear", backend="reference").process_weights(ckpt)
    kernel = Int8PackMM(LinearKernelConfig("W8A16", k, n, 0, "cpu", {}))
    x, bias = make_input((5,), k, torch.float32), torch.randn(n)
    y = kernel.run(kernel.prepare(dict(canonical)), x, bias)
    assert rel_err(y, reference(ckpt, x, bias)) < BF16_PATH


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_digits_kernel_is_float_accurate_at_any_magnitude(scale):
    """Three int8 digits per token: the error stays at fp32 resolution of each row's largest input, whatever the
    row's magnitude and spread (rows from 1e-6 to 1 of the largest, one outlier channel)."""
    ckpt = checkpoint(576, 40)
    x = make_input((6,), 576, torch.float32) * torch.logspace(-6, 0, 6)[:, None]
    x[:, 7] *= 50
    x = x * scale
    runtime = quant_core.get_scheme("W8A16", "linear").process_weights(ckpt)
    assert runtime.kernel.name == "cpu-fbgemm-int8-digits"
    y = quant_core.get_scheme("W8A16", "linear").apply(runtime, x).double()
    ref = reference(ckpt, x)
    for row in range(6):  # per row: each row is its own digit scale
        assert rel_err(y[row], ref[row]) < 1e-5, row


def check_digits_saturating_case() -> None:
    """All-positive full-range activations against +127 weights: the case where one u8 × s8 pass saturates int16."""
    ckpt = {"weight": torch.full((8, 256), 127, dtype=torch.int8), "weight_scale": torch.full((8, 1), 0.01),
            "weight_offset": torch.zeros(8, 1)}  # fmt: skip
    x = torch.rand(4, 256) + 0.5
    scheme = quant_core.get_scheme("W8A16", "linear")
    runtime = scheme.process_weights(ckpt)
    assert runtime.kernel.name == "cpu-fbgemm-int8-digits"
    assert rel_err(scheme.apply(runtime, x), reference(ckpt, x)) < 1e-5


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_digits_kernel_is_exact_where_u8_s8_pairs_saturate(isa):
    # AVX2: fbgemm on vpmaddubsw, where int16 pair sums saturate; the digits go through the exact split there too
    if isa == "native":
        check_digits_saturating_case()
    else:
        run_with_fbgemm_isa(isa, "test_w8a16", "check_digits_saturating_case")
