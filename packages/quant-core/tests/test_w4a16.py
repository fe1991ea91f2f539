import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, EVEN_N_SHAPES, make_input, make_weight, output_tolerance, rel_err

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError
from quant_core.kernels.weight_only import Int4PackMM

# The reference backend and the cpu fallback dequantize and multiply in float32: against float64 only accumulation
# rounding (~1e-7 · √K) remains. 1e-5 catches any real mistake (a wrong nibble order, offset sign or group axis is
# ≥ 1e-1).
EXACT = 1e-5
# The cpu (int4pack) and npu kernels run in bf16: x (fp32 inputs), the scales, the zeros (cpu: -offset·scale) and
# the output are each rounded to bf16, a relative rms error of 2^-9/√3 ≈ 1.1e-3 apiece, ≈ 2-3e-3 together
# (measured: ≤ 4e-3). 1e-2 is 2.5x that.
BF16_PATH = 1e-2
G = 64  # the group size msModelSlim wrote
# (128, 40): N is even but not a multiple of 16 and there are 2 groups, so cpu falls back to dequantize + F.linear.
W4_SHAPES = [*EVEN_N_SHAPES, (128, 40)]


def pack(values: torch.Tensor) -> torch.Tensor:
    """ModelSlim int4 layout, written from the spec: byte [j, k] = row 2j (low nibble) | row 2j+1 (high nibble)."""
    v = values.to(torch.int16) & 0xF
    return (v[0::2] | (v[1::2] << 4)).to(torch.uint8).view(torch.int8)


def checkpoint(k: int, n: int, g: int = G, scale_dtype=torch.float32, seed: int = 1) -> dict[str, torch.Tensor]:
    """A v0 W4A16 checkpoint: packed int4 weight, group-wise scale and integer offset (float32 as msModelSlim wrote)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // (g or k)
    return {
        "weight": pack(torch.randint(-8, 8, (n, k), generator=gen)),
        "weight_scale": (torch.rand(n, groups, generator=gen) * 0.1 + 0.01).to(scale_dtype),
        "weight_offset": torch.randint(-8, 8, (n, groups), generator=gen).float().to(scale_dtype),
    }


def unpack(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = ((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8  # sign-extend each nibble
    return torch.stack((low, high), dim=1).reshape(2 * b.shape[0], b.shape[1])


def reference(ckpt, x, bias=None, sign=-1):
    """float64 ``x Wᵀ + b`` with ``W[n, k] = (w4 - offset[n, k//g]) · scale[n, k//g]`` (``sign=+1``: added offset)."""
    q = unpack(ckpt["weight"]).double()
    g = q.shape[1] // ckpt["weight_scale"].shape[1]
    scale = ckpt["weight_scale"].double().repeat_interleave(g, dim=1)
    offset = ckpt["weight_offset"].double().repeat_interleave(g, dim=1)
    y = x.double() @ ((q + sign * offset) * scale).T
    return y if bias is None else y + bias.double()


def check_apply(scheme, ckpt, x, bias, exact_bound):
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    y = scheme.apply(runtime, x, bias)
    n = 2 * ckpt["weight"].shape[0]
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    # float32 throughout, or float-accurate (int8 digits of the activations: fp32 resolution)
    exact = runtime.kernel.name in ("reference-weight-only", "cpu-dequant-linear", "cpu-fbgemm-int8-digits")
    bound = exact_bound if exact else BF16_PATH
    err = rel_err(y, reference(ckpt, x, bias))
    assert err < bound, f"{scheme.backend} ({runtime.kernel.name}): rel err {err:.2e} ≥ {bound:.0e}"
    # the offset sign matters: adding it (the npu op's convention, unnegated) fails
    assert rel_err(y, reference(ckpt, x, bias, sign=+1)) > 10 * bound
    return runtime


@pytest.mark.parametrize(("k", "n"), W4_SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, k, n, batch, dtype):
    scheme = quant_core.get_scheme("W4A16", "linear", backend=backend, version="0", group_size=G)
    x = make_input(batch, k, dtype)
    check_apply(scheme, checkpoint(k, n), x, torch.randn(n).to(dtype), output_tolerance(dtype, EXACT))


@pytest.mark.parametrize(
    ("k", "n", "g", "cpu_kernel"),
    [
        (576, 96, 0, "cpu-int4pack-mm"),  # one group spanning K: tinygemm groups of 64 repeating the scale
        (64, 40, 0, "cpu-fbgemm-int8-digits"),  # per channel, N not a multiple of 16: int4 values as int8
        (576, 96, 192, "cpu-int4pack-mm"),  # 192 split into tinygemm groups of 64
        (64, 48, 32, "cpu-int4pack-mm"),
        (64, 48, 16, "cpu-dequant-linear"),  # tinygemm takes no group below 32
    ],
)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_other_group_sizes_and_scale_dtypes(backend, k, n, g, cpu_kernel, scale_dtype):
    scheme = quant_core.get_scheme("W4A16", "linear", backend=backend, group_size=g)
    ckpt = checkpoint(k, n, g, scale_dtype)
    runtime = check_apply(scheme, ckpt, make_input((5,), k, torch.float32), torch.randn(n), EXACT)
    if backend == "cpu":
        assert runtime.kernel.name == cpu_kernel


def test_npu_path_calls_the_upstream_ops(npu):
    scheme = quant_core.get_scheme("W4A16", "linear", backend="npu", group_size=G)
    ckpt = checkpoint(128, 48)
    runtime = scheme.process_weights(ckpt)
    assert runtime["weight"].dtype == torch.int32 and runtime["weight"].shape == (128, 6)  # [K, N/8]
    assert runtime["antiquant_scale"].shape == (2, 48)  # [K/g, N]
    assert torch.equal(runtime["antiquant_offset"], -ckpt["weight_offset"].T)  # the op adds it
    scheme.apply(runtime, make_input((3,), 128, torch.bfloat16))
    assert npu == ["npu_convert_weight_to_int4pack", "npu_weight_quant_batchmatmul"]


@pytest.mark.parametrize(("k", "n"), [(64, 48), (576, 96), (256, 128)])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize(("g", "bound"), [(64, 0.13), (0, 0.18)])
def test_quantize_process_apply_round_trip(k, n, backend_name, g, bound):
    # Asymmetric RTN int4 has step = range / 15. The range of a group of 64 Gaussian weights is ≈ 4.9 σ, so the
    # weight error is step/√12 ≈ 9.4 % of rms (modelslim-tool §4.7 measured 9 % on msModelSlim's output) and so is
    # the output's; one group per row of 256-576 has range ≈ 6-6.5 σ: ≈ 12 %. The bounds are ≈ 1.4x those; the
    # measured errors (8.9-9.4 % and 11-12 %) average over N·K weights, so they barely fluctuate.
    scheme = quant_core.get_scheme("W4A16", "linear", backend=backend_name, group_size=g)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight)
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight"].shape == (n // 2, k) and tensors["weight_scale"].dtype == torch.float32
    x = make_input((16,), k, torch.float32)
    y = scheme.apply(scheme.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < bound


def test_zero_rows_give_zero_output(backend):
    scheme = quant_core.get_scheme("W4A16", "linear", backend=backend, group_size=G)
    runtime = scheme.process_weights(checkpoint(64, 48))
    assert torch.equal(scheme.apply(runtime, torch.zeros(3, 64)), torch.zeros(3, 48))


def test_non_contiguous_fp16_input(backend):
    scheme = quant_core.get_scheme("W4A16", "linear", backend=backend, group_size=G)
    ckpt = checkpoint(128, 48)
    x = make_input((3,), 128, torch.float32).T.contiguous().T.half()  # a transposed view
    assert not x.is_contiguous()
    y = scheme.apply(scheme.process_weights(ckpt), x)
    assert y.dtype == torch.float16 and rel_err(y, reference(ckpt, x)) < BF16_PATH


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(weight=c["weight"].view(torch.uint8)), r"'L\.weight' has dtype torch\.uint8"),
        (
            lambda c: c.update(weight=unpack(c["weight"]).to(torch.int8)),
            r"L\.weight has shape \(96, 128\), .* looks unpacked",
        ),
        (lambda c: c.update(weight_scale=c["weight_scale"][:, :1]), r"'L\.weight_scale' has shape \(96, 1\), expe"),
        (lambda c: c["weight_scale"].__setitem__((3, 0), float("nan")), r"'L\.weight_scale' contains NaN or Inf"),
        (lambda c: c["weight_scale"].__setitem__((5, 1), 0.0), r"'L\.weight_scale' has 1 zero or negative scale"),
        (lambda c: c["weight_scale"].__setitem__((5, 0), -1.0), r"zero or negative"),
        (lambda c: c["weight_offset"].__setitem__((0, 0), float("nan")), r"'L\.weight_offset' contains NaN or Inf"),
        (lambda c: c.pop("weight_offset"), r"'L' is missing L\.weight_offset"),
        (lambda c: c.update(scale_bias=torch.ones(96, 1)), r"does not use: L\.scale_bias"),
        (lambda c: c.update(weight=c["weight"][None]), r"weight must be 2-D"),
    ],
)
def test_bad_checkpoint_tensors_are_named(change, match):
    ckpt = checkpoint(128, 96)
    change(ckpt)
    scheme = quant_core.get_scheme("W4A16", "linear", group_size=G)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.process_weights(ckpt, layer="L")


def test_group_size_not_dividing_k_says_what_to_choose():
    scheme = quant_core.get_scheme("W4A16", "linear", group_size=128)
    match = r"group_size 128 does not divide in_features 576\. Choose a group_size that does: 32, 64, or 0"
    with pytest.raises(CheckpointTensorError, match="layer 'L': W4A16 " + match):
        scheme.process_weights(checkpoint(576, 96), layer="L")
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.weight_specs(576, 96, torch.bfloat16)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme.quantize_weights(make_weight(96, 576))
    with pytest.raises(CheckpointTensorError, match=r"does not divide in_features 100\. .* does: 0 \(one group"):
        scheme.weight_specs(100, 96, torch.bfloat16)


def test_odd_out_features_are_refused():
    scheme = quant_core.get_scheme("W4A16", "linear", group_size=32)
    with pytest.raises(CheckpointTensorError, match=r"out_features must be even, got 33.* W8A16"):
        scheme.weight_specs(96, 33, torch.bfloat16)
    with pytest.raises(CheckpointTensorError, match="out_features must be even, got 33"):
        scheme.quantize_weights(make_weight(33, 96))


def test_a_checkpoint_with_another_group_size_is_refused():
    scheme = quant_core.get_scheme("W4A16", "linear", group_size=32)
    with pytest.raises(CheckpointTensorError, match=r"'L\.weight_scale' has shape \(48, 2\), expected \(48, 4\)"):
        scheme.process_weights(checkpoint(128, 48, g=64), layer="L")


def test_kernel_choice_explains_fallbacks():
    def config(n, g):
        return quant_core.kernels.LinearKernelConfig("W4A16", 64, n, g, options={"bits": 4})

    assert Int4PackMM.can_implement(config(40, 64)) == (False, "N=40 is not a multiple of 16")
    assert Int4PackMM.can_implement(config(48, 16))[1].startswith("group size 16 is not a multiple of one of")
    scheme = quant_core.get_scheme("W4A16", "linear", backend="npu", group_size=32)
    with pytest.raises(KernelUnavailableError, match="npu-weight-quant-batchmatmul: N=36 is not a multiple of 8"):
        scheme.process_weights(checkpoint(64, 36, g=32))


def test_auto_prefers_the_fast_cpu_kernel():
    runtime = quant_core.get_scheme("W4A16", "linear", group_size=G).process_weights(checkpoint(576, 96))
    assert runtime.kernel.name == "cpu-int4pack-mm"
