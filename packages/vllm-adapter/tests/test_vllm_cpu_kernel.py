"""quant-core's ``cpu-vllm-onednn-int8-dynamic`` kernel (vLLM's own CPU int8 ops, chosen for W8A8_DYNAMIC once vLLM
has registered them) against quant-core's reference (exact int32 sums on the spec's codes) and an independent float64
reference, without an engine. The engine tests of the other files run it end to end."""

import gc

import pytest
import torch

pytest.importorskip("vllm")
import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

import quant_core
from quant_core.kernels.vllm_cpu import vllm_cpu_ops_loaded

SHAPES = [(576, 960), (100, 37), (1536, 576), (64, 48), (33, 7)]
# The kernel's codes equal the spec's except where x / s lies within an ulp of a rounding boundary (the op multiplies
# by 1 / s): one such flip moves one output by s_tok · s_w · |w| ≤ 1/127 of one of its K products, under 1e-4 of the
# output's norm here; otherwise int32 sums are exact and only the fp32 epilogue rounds (measured ≤ 6e-8).
KERNEL_VS_EXACT = 1e-4


def layer(k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scheme = quant_core.get_scheme("W8A8_DYNAMIC", "linear")
    tensors = scheme.quantize_weights(torch.randn(n, k, generator=g))
    return scheme, tensors, torch.randn(n, generator=g)


def inputs(m: int, k: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 10 + 0.1)
    x[:, min(3, k - 1)] *= 30  # an outlier channel, as LLM activations have
    x[0] = 0  # an all-zero row: codes and output zero (bias only)
    return x.to(dtype)


def float64_reference(tensors, x, bias):
    x64 = x.double()
    s = x64.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(x64 / torch.where(s > 0, s, torch.ones_like(s)))
    w = tensors["weight"].double() * tensors["weight_scale"].double().reshape(-1, 1)
    return codes @ w.T * s + bias.double()


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_ops_are_loaded_and_chosen():
    assert vllm_cpu_ops_loaded() == (True, "")
    scheme, tensors, _ = layer(64, 48)
    assert scheme.process_weights(tensors).kernel.name == "cpu-vllm-onednn-int8-dynamic"


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_exact_reference(k, n, m, dtype):
    scheme, tensors, bias = layer(k, n)
    runtime = scheme.process_weights(tensors)
    reference = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="reference")
    x = inputs(m, k, dtype)
    y = scheme.apply(runtime, x, bias.to(dtype))
    exact = reference.apply(reference.process_weights(tensors), x, bias.to(dtype))
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y[0], bias.to(dtype))  # the zero row
    # bf16 outputs: both sides round their fp32 result to bf16 (2^-9 relative), so compare at that resolution
    bound = KERNEL_VS_EXACT if dtype == torch.float32 else 1e-2
    assert rel_err(y, exact) < bound
    if dtype == torch.float32:
        assert rel_err(y, float64_reference(tensors, x, bias)) < KERNEL_VS_EXACT
        assert rel_err(y, x.double() @ (tensors["weight"].double() * tensors["weight_scale"].double()).T) > 1e-4


@pytest.mark.parametrize(("k", "n"), [(576, 960), (64, 48)])
def test_split_rows_with_the_amax_reducer_sum_to_the_whole(k, n):
    """Tensor parallelism: each half of K quantized on the whole row's scale (the reducer) sums to the unsplit layer."""
    scheme, tensors, bias = layer(k, n)
    x = inputs(5, k)
    whole = scheme.apply(scheme.process_weights(tensors), x, bias)
    half = k // 2
    row_amax = x.abs().amax(-1, keepdim=True)
    parts = []
    for cols in (slice(0, half), slice(half, k)):
        part = {**tensors, "weight": tensors["weight"][:, cols].contiguous()}
        runtime = scheme.process_weights(part)
        runtime.amax_reduce = lambda amax: torch.maximum(amax, row_amax)
        parts.append(scheme.apply(runtime, x[:, cols].contiguous()))
    assert rel_err(parts[0] + parts[1] + bias, whole) < KERNEL_VS_EXACT


def test_runtime_outlives_the_checkpoint_tensors():
    """The oneDNN handler keeps pointers into what it was given (the scales): once the checkpoint tensors are freed
    and their memory reused, the layer must still compute the same thing (a dangling scale gave inf)."""
    scheme, tensors, _ = layer(64, 96)
    reference = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="reference").process_weights(tensors)
    runtimes = [scheme.process_weights({name: t.clone() for name, t in tensors.items()}) for _ in range(8)]
    gc.collect()
    reuse = [torch.full((256, 256), 7.0) for _ in range(64)]  # noqa: F841  (takes the freed blocks)
    x = inputs(3, 64)
    exact = quant_core.get_scheme("W8A8_DYNAMIC", "linear", backend="reference").apply(reference, x)
    for runtime in runtimes:
        assert rel_err(scheme.apply(runtime, x), exact) < KERNEL_VS_EXACT
