import pytest
import torch
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

# Exact backends reproduce the spec's integer arithmetic; the only differences from the float64 reference are
# float32 epilogue rounding (~1e-7) and, rarely, a one-LSB flip of x_q where x / s sits on a rounding tie in one
# precision but not the other (≤ 1/127 of one term). 1e-4 leaves room for that and catches any real mistake
# (a wrong scale axis or a missing term is ≥ 1e-1).
EXACT = 1e-4
# fbgemm quantizes each unit-absmax row to 7 bits (reduce_range): grid step 2/127 of the row range, i.e. a
# relative rms activation error ≈ amax / (63.5 · √12 · rms) ≈ 1.5 % for Gaussian rows (amax ≈ 3.3 rms at K ≈ 576),
# which the matmul keeps at the same relative size. 3e-2 is twice that.
FBGEMM_VS_FLOAT = 3e-2


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
    if backend == "cpu":
        err, bound = rel_err(y, reference(ckpt, x, bias, act_quant=False)), FBGEMM_VS_FLOAT
    else:
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
    # Per-channel int8 weights (≈0.7 % rms error for Gaussian rows) plus per-token int8 activations (≈0.7 %,
    # 1.5 % with fbgemm's 7-bit grid) add to ≈1-2 %; 3e-2 / 4e-2 bound it with margin.
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend=backend_name)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight)
    specs = scheme.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    assert tensors["weight_scale"].dtype == torch.float32  # v1 layout
    x = make_input((16,), k, torch.float32)
    y = scheme.apply(scheme.process_weights(tensors), x)
    bound = 3e-2 if backend_name == "reference" else 4e-2
    assert rel_err(y, x.double() @ weight.double().T) < bound


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


def test_cpu_kernel_is_batch_invariant():
    # True per-token quantization gives a row the same result whatever else is in the batch; the fbgemm kernel
    # pins its per-tensor range so that it does too (vLLM batches rows differently from a plain forward).
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="cpu")
    runtime = scheme.process_weights(checkpoint(96, 48))
    x = make_input((5,), 96, torch.float32) * torch.tensor([0.1, 1.0, 10.0, 3.0, 0.5])[:, None]
    batched = scheme.apply(runtime, x)
    one_by_one = torch.cat([scheme.apply(runtime, row[None]) for row in x])
    assert torch.equal(batched, one_by_one)
