"""Linear schemes' `apply` against fp32 F.linear, same shapes, same run (nox -s perf).

Shapes K×N ∈ {2048×2048, 4096×11008}, M ∈ {1, 8, 128}; activations fp32 (the model dtype a CPU deployment
uses: bf16 F.linear is 1.5-9x slower than fp32 on AVX2). Every scheme runs with backend="auto", i.e. what a
user gets on this machine.
"""

import pytest
import torch
import torch.nn.functional as F

import quant_core

SHAPES = [(2048, 2048), (4096, 11008)]
MS = [1, 8, 128]
# (label, quant_type, scheme options, calibration for quantize_weights)
SCHEMES = [
    ("W8A8_DYNAMIC", "W8A8_DYNAMIC", {}, {}),
    ("W8A8", "W8A8", {}, {"act_min": -4.0, "act_max": 4.0}),
    ("W8A8_MIX-dynamic", "W8A8_MIX", {"mode": "dynamic"}, {"act_min": -4.0, "act_max": 4.0}),
    ("W8A16", "W8A16", {}, {}),
    ("W4A16-g128", "W4A16", {"group_size": 128}, {}),
    ("W4A8_DYNAMIC", "W4A8_DYNAMIC", {}, {}),
    ("W4A8_DYNAMIC-g256", "W4A8_DYNAMIC", {"group_size": 256}, {}),
    ("W4A4_DYNAMIC", "W4A4_DYNAMIC", {}, {}),
    ("W4A4_FLATQUANT_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC", {}, {}),
]
_WEIGHTS: dict[tuple[int, int], torch.Tensor] = {}


def weight(k: int, n: int) -> torch.Tensor:
    if (k, n) not in _WEIGHTS:
        _WEIGHTS[(k, n)] = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5
    return _WEIGHTS[(k, n)]


def label(shape):
    return f"{shape[0]}x{shape[1]}"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=label)
def test_fp32_linear(benchmark, shape, m):
    k, n = shape
    benchmark.group = f"linear {label(shape)} M={m}"
    benchmark.extra_info.update(kind="linear", scheme="fp32", shape=label(shape), M=m)
    x = torch.randn(m, k)
    benchmark(F.linear, x, weight(k, n))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=label)
@pytest.mark.parametrize(("name", "quant_type", "options", "calibration"), SCHEMES, ids=[s[0] for s in SCHEMES])
def test_quantized_linear(benchmark, name, quant_type, options, calibration, shape, m):
    k, n = shape
    if (quant_type, "linear") not in quant_core.DEFAULT_REGISTRY:
        pytest.skip(f"{quant_type} linear is not implemented")
    scheme = quant_core.get_scheme(quant_type, "linear", **options)
    runtime = scheme.process_weights(scheme.quantize_weights(weight(k, n), **calibration))
    benchmark.group = f"linear {label(shape)} M={m}"
    benchmark.extra_info.update(kind="linear", scheme=name, shape=label(shape), M=m, kernel=runtime.kernel.name)
    x = torch.randn(m, k)
    benchmark(scheme.apply, runtime, x)
