"""``Runtime.amax_reduce``: a layer split along K (a row-parallel layer under tensor parallelism) quantizes each part
of a token with the whole row's per-token scale, so the parts' outputs sum to the unsplit layer's.

Each per-token scheme, on every backend (npu on the emulator): the checkpoint is cut into two K-halves of unequal or
odd sizes, each half runs with a reducer returning the max of both halves' own amax (what an all-reduce MAX over two
ranks returns; the amax each half's kernel computes is first recorded by an identity reducer), half 0 adds the bias
(rank 0), and the sum is compared with the unsplit apply. FlatQuant mixes the whole row, but with a left factor
``I_a`` its transform acts on each ``b``-block of the row separately, so a split at a block boundary is exact too.
"""

import pytest
import torch
from linear_cases import make_input, make_weight

import quant_core
from quant_core.kernels import Runtime

# Both sides quantize to the same codes with the same scales, so they differ by float32 rounding only: the integer
# kernels scale exact int32 sums (≤ 3 roundings per partial, 1 for the sum: ≤ 4 · 2^-24 relative to the partials'
# magnitude); the FP8 kernels sum K ≤ 144 products in float32 in another order (≤ K · 2^-24 · Σ|products| worst
# case, ~√K · 2^-24 typical). 2^-16 (1.5e-5) of the row's largest |y_0| + |y_1| + |bias| covers both (measured:
# ≤ 2.2e-7). The NPU W4A4 kernel returns float16 as upstream's does: ≤ 2^-11 per partial and for the whole, so 2^-9
# (measured: 1.3e-4). Per-half scales (no reducer) differ by 3.4e-3 to 7.6e-2 of that magnitude; the test asserts
# more than 4 bounds, so it can fail.
TOL = 2.0**-16
FP16_OUTPUT_TOL = 2.0**-9


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# quant type -> (scheme options, quantize_weights kwargs builder, [(M, K, N, split)]). Splits keep both halves
# K % 8 == 0 where the NPU packs int4 along K (W4A4), whole scale_bias chunks (W4A8: K/16) and whole b-blocks
# (FlatQuant, b given by the right factor's size).
def no_calibration(k: int) -> dict:
    return {}


def static_calibration(k: int) -> dict:
    return {"input_scale": 0.02, "input_offset": 3.0}


def flatquant(b: int, clip: float = 1.0):
    def calibration(k: int) -> dict:
        return {"left_trans": torch.eye(k // b), "right_trans": orthogonal(b, k), "clip_ratio": clip}

    return calibration


CASES = {
    "W8A8_DYNAMIC": ({}, no_calibration, [(5, 67, 13, 33), (3, 130, 7, 65), (33, 96, 24, 40)]),
    "W8A8_MIX": ({"mode": "dynamic"}, static_calibration, [(5, 67, 13, 33), (3, 130, 7, 65)]),
    "W4A8_DYNAMIC": ({"row_parallel": True}, no_calibration, [(5, 80, 14, 40), (3, 144, 6, 72)]),
    "W4A4_DYNAMIC": ({}, no_calibration, [(5, 72, 13, 32), (3, 200, 7, 96)]),
    "WFP8AFP8_DYNAMIC": ({}, no_calibration, [(5, 67, 13, 33), (3, 130, 7, 65)]),
    "W8A8_FLATQUANT_DYNAMIC": ({}, flatquant(11), [(5, 66, 13, 33), (3, 99, 7, 44)]),
    "W4A8_FLATQUANT_DYNAMIC": ({}, flatquant(11), [(5, 66, 14, 22)]),
    "W4A4_FLATQUANT_DYNAMIC": ({}, flatquant(8, clip=0.9), [(5, 48, 13, 24), (3, 64, 7, 40)]),
}
PARAMS = [(qt, shape) for qt, (_, _, shapes) in CASES.items() for shape in shapes]


def checkpoint(quant_type: str, k: int, n: int) -> tuple[dict, dict]:
    options, calibration, _ = CASES[quant_type]
    writer = quant_core.get_scheme(quant_type, "linear", version="1.0.0", **options)
    return writer.quantize_weights(make_weight(n, k), **calibration(k)), options


def k_slice(quant_type: str, tensors: dict, options: dict, start: int, stop: int) -> dict:
    """The checkpoint of ``K[start:stop]``: every tensor running along K cut in proportion; FlatQuant's ``I_a``
    left factor becomes the part's own identity."""
    n, k = tensors["weight_scale"].shape[0], tensors["weight"].shape[1]
    if "left_trans" in tensors:  # K = 66 has no default L × R split
        options = {**options, "left_dim": tensors["left_trans"].shape[0]}
    specs = quant_core.get_scheme(quant_type, "linear", version="1.0.0", **options).weight_specs(k, n, torch.float32)
    part = {}
    for name, t in tensors.items():
        dim = specs[name].input_dim
        if dim is not None and t.shape[dim] > 1:
            per = t.shape[dim] / k
            t = t.narrow(dim, round(start * per), round((stop - start) * per))
        part[name] = t
    if "left_trans" in tensors:
        b = tensors["right_trans"].shape[0]
        part["left_trans"] = torch.eye((stop - start) // b)
    return part


def split_apply(scheme, runtimes: list[Runtime], parts: list[torch.Tensor], bias, reduce: bool) -> torch.Tensor:
    """Σ over the parts (the bias on part 0), each part's amax reduced to the max over the parts if ``reduce``."""
    seen: list[torch.Tensor] = []

    def record(amax: torch.Tensor) -> torch.Tensor:
        seen.append(amax.clone())
        return amax

    for runtime, x in zip(runtimes, parts, strict=True):
        runtime.amax_reduce = record
        scheme.apply(runtime, x)
    assert len(seen) == len(parts), "each part's kernel calls the reducer exactly once per apply"
    whole = torch.stack(seen).amax(0)
    y = 0
    for i, (runtime, x) in enumerate(zip(runtimes, parts, strict=True)):
        runtime.amax_reduce = (lambda amax: torch.maximum(amax, whole)) if reduce else None
        y = y + scheme.apply(runtime, x, bias if i == 0 else None).double()
    return y


@pytest.mark.parametrize(("quant_type", "shape"), PARAMS, ids=[f"{q}-{'x'.join(map(str, s))}" for q, s in PARAMS])
def test_halves_with_reduced_amax_sum_to_the_whole(backend, quant_type, shape):
    m, k, n, split = shape
    tensors, options = checkpoint(quant_type, k, n)
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend, version="1.0.0", **options)
    x = make_input((m,), k, torch.float32)
    x[0, :split] = 0  # one half of a token is zero: its scale must come from the other half
    x[1] = 0  # an all-zero token: outputs exactly the bias
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    whole = scheme.apply(scheme.process_weights(tensors, layer="whole"), x, bias).double()
    runtimes = [scheme.process_weights(k_slice(quant_type, tensors, options, a, b), layer=f"part{a}")
                for a, b in ((0, split), (split, k))]  # fmt: skip
    parts = [x[:, :split], x[:, split:]]
    y = split_apply(scheme, runtimes, parts, bias, reduce=True)
    partials = sum(scheme.apply(r, p).double().abs() for r, p in zip(runtimes, parts, strict=True))
    tol = FP16_OUTPUT_TOL if (backend, quant_type) == ("npu", "W4A4_DYNAMIC") else TOL
    bound = tol * (partials + bias.double().abs()).amax(-1, keepdim=True)
    assert ((y - whole).abs() <= bound).all(), f"max diff {(y - whole).abs().max():.3g}, bound {bound.min():.3g}"
    assert torch.equal(whole[1], bias.double()) and torch.equal(y[1], bias.double())
    per_half = split_apply(scheme, runtimes, parts, bias, reduce=False)
    assert ((per_half - whole).abs() > 4 * bound).any(), "per-half scales should differ"


@pytest.mark.parametrize("quant_type", sorted(CASES))
def test_identity_reducer_changes_nothing(backend, quant_type):
    m, k, n, _ = CASES[quant_type][2][0]
    tensors, options = checkpoint(quant_type, k, n)
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend, version="1.0.0", **options)
    runtime = scheme.process_weights(tensors)
    assert runtime.amax_reduce is None
    x, bias = make_input((m,), k, torch.float32), torch.randn(n)
    plain = scheme.apply(runtime, x, bias)
    calls = []
    runtime.amax_reduce = lambda amax: calls.append((amax.shape, amax.dtype)) or amax
    reduced = scheme.apply(runtime, x, bias)
    assert calls == [((m, 1), torch.float32)]
    if backend == "npu":  # npu_quantize with our float32 scale instead of npu_dynamic_quant's: same codes but ties
        torch.testing.assert_close(reduced, plain, rtol=0, atol=FP16_OUTPUT_TOL * plain.abs().max().item())
    else:
        assert torch.equal(reduced, plain)


@pytest.mark.parametrize("quant_type", ["W8A8", "W8A16", "W4A16", "W8A8_MXFP8", "W4A4_MXFP4"])
def test_schemes_without_per_token_scales_never_reduce(quant_type):
    k, n = 64, 16
    calibration = static_calibration(k) if quant_type == "W8A8" else {}
    writer = quant_core.get_scheme(quant_type, "linear", version="1.0.0", group_size=32 if "A16" in quant_type else 0)
    runtime = writer.process_weights(writer.quantize_weights(make_weight(n, k), **calibration))

    def refuse(amax):
        raise AssertionError(f"{quant_type} has no per-token scale to reduce")

    runtime.amax_reduce = refuse
    writer.apply(runtime, make_input((3,), k, torch.float32))
