import pytest
import torch
from fbgemm_isa import run_with_fbgemm_isa
from linear_cases import (
    ACT_DTYPES,
    BATCH_SHAPES,
    EVEN_N_SHAPES,
    fake_quant_per_token,
    make_input,
    make_weight,
    output_tolerance,
    rel_err,
)

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError
from quant_core.primitives import pack_int4_rows, pack_int4_words, unpack_int4_rows, unpack_int4_words

# Exact backends reproduce the spec's arithmetic (integer matmul for the per-channel form, float for the per-group
# form; cpu's per-channel fbgemm kernel takes the spec's own int8 codes); vs the float64 reference only float32
# rounding (~1e-7, measured ≤ 4.3e-8 on reference and cpu) and rare one-LSB ties of x_q remain (≤ 1/127 of one
# term). 1e-4 catches any real mistake (a wrong scale axis, group index or nibble order is ≥ 1e-1).
EXACT = 1e-4
# int4pack rounds activations, the combined per-group scale and the output to bf16: 2^-9 relative each at most,
# ≈1.1e-3 rms each, ≈2e-3 together (cpu-kernels.md §5 measured 2.3e-3). 1e-2 is 4x that; a wrong scale is ≥ 1e-1.
INT4PACK_VS_FLOAT = 1e-2
G = 64  # the group size msModelSlim's v0 pipeline wrote
SHAPES = [*EVEN_N_SHAPES, (128, 36)]  # N = 36: not a multiple of 8 or 16, the packed npu / int4pack paths refuse it


# --- checkpoints written from the spec, independently of quant_core ------------------------------------------
def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[N, K] int4 values -> int8 [N/2, K]: row 2j in the low nibble, row 2j+1 in the high nibble."""
    v = values.to(torch.int32)
    return ((v[0::2] & 0xF) | ((v[1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    u = packed.view(torch.uint8).to(torch.int32)
    lo, hi = u & 0xF, u >> 4
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    return torch.stack((lo, hi), dim=1).reshape(2 * u.shape[0], u.shape[1])


def dequant(ckpt, g=0) -> torch.Tensor:
    w = unpack_rows(ckpt["weight"]).double() * ckpt["weight_scale"].double()
    if g:
        w = w * ckpt["weight_scale_second"].double().repeat_interleave(g, dim=1)
    return w


def with_scale_bias(ckpt, g=0, chunks=1):
    w = dequant(ckpt, g)
    n, k = w.shape
    ckpt["scale_bias"] = (8 * w.reshape(n, chunks, k // chunks).sum(-1)).float()
    return ckpt


def checkpoint(k, n, g=0, chunks=1, seed=1):
    """Per-channel (g=0) as msModelSlim v1 writes it, or two-step per-group as its v0 pipeline does: int4 packed
    along N, float32 scales, zero offsets (the second one int64), integer-valued weight_scale_second."""
    gen = torch.Generator().manual_seed(seed)
    w4 = torch.randint(-8, 8, (n, k), generator=gen)
    ckpt = {
        "weight": pack_rows(w4),
        "weight_scale": torch.rand(n, 1, generator=gen) * 1e-2 + 1e-3,
        "weight_offset": torch.zeros(n, 1),
    }
    if g:
        ckpt["weight_scale"] /= 16
        ckpt["weight_scale_second"] = torch.randint(1, 19, (n, k // g), generator=gen).float()
        ckpt["weight_offset_second"] = torch.zeros(n, k // g, dtype=torch.int64)
    return with_scale_bias(ckpt, g, chunks)


def reference(ckpt, x, bias=None, g=0, act_quant=True):
    xq = fake_quant_per_token(x, 127) if act_quant and not g else x.double()
    y = xq @ dequant(ckpt, g).T
    return y if bias is None else y + bias.double()


def scheme(backend="reference", g=0, **options):
    return quant_core.get_scheme("W4A8_DYNAMIC", "linear", backend=backend, version="1.0.0", group_size=g, **options)


# --- int4 packing --------------------------------------------------------------------------------------------
def test_row_packing_round_trips_every_nibble_pair():
    lo, hi = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    values = torch.stack((lo.flatten(), hi.flatten())).to(torch.int8)  # [2, 256]: every (low, high) pair
    packed = pack_int4_rows(values)
    assert packed.shape == (1, 256) and packed.dtype == torch.int8
    expected = [((h & 0xF) << 4) | (lo_ & 0xF) for lo_, h in zip(values[0].tolist(), values[1].tolist(), strict=True)]
    assert packed.view(torch.uint8)[0].tolist() == expected
    assert torch.equal(unpack_int4_rows(packed), values)
    assert torch.equal(unpack_rows(packed), values.int())


def test_word_packing_round_trips_every_value_in_every_position():
    values = ((torch.arange(16)[:, None] + torch.arange(8)) % 16 - 8).to(torch.int8)  # [16, 8]
    words = pack_int4_words(values)
    assert words.shape == (16, 1) and words.dtype == torch.int32
    assert torch.equal(unpack_int4_words(words), values)
    nibbles = [[(w >> (4 * i)) & 0xF for i in range(8)] for w in words[:, 0].tolist()]
    assert nibbles == (values & 0xF).tolist()  # element i in bits 4i..4i+3


def test_checkpoint_bytes_viewed_as_words_equal_the_npu_int4_pack(npu):
    # Upstream v1.0.0 viewed the transposed [K, N/2] checkpoint bytes as int32; the same words as packing [K, N].
    import npu_emulator

    w4 = torch.randint(-8, 8, (48, 64), generator=torch.Generator().manual_seed(3))
    viewed = pack_rows(w4).T.contiguous().view(torch.int32)
    assert torch.equal(viewed, npu_emulator.npu_convert_weight_to_int4pack(w4.T.contiguous().int()))


# --- apply vs the float64 reference --------------------------------------------------------------------------
@pytest.mark.parametrize("g", [0, G], ids=["per-channel", "per-group"])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, g, k, n, batch, dtype):
    s = scheme(backend, g)
    ckpt = checkpoint(k, n, g, chunks=16 if k % 16 == 0 else 1)
    runtime = s.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = s.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    if runtime.kernel.name == "cpu-int4pack-w4-group":
        err, bound = rel_err(y, reference(ckpt, x, bias, g)), INT4PACK_VS_FLOAT
    else:
        err, bound = rel_err(y, reference(ckpt, x, bias, g)), output_tolerance(dtype, EXACT)
    assert err < bound, f"{runtime.kernel.name}: rel err {err:.2e} ≥ {bound:.0e}"


@pytest.mark.parametrize("g", [32, 128, 256, 16])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_group_sizes(g, backend_name):
    s = scheme(backend_name, g)
    ckpt = checkpoint(256, 64, g)
    runtime = s.process_weights(ckpt)
    if backend_name == "cpu":  # int4pack takes 32..256 only
        assert runtime.kernel.name == ("cpu-dequant-w4-group" if g == 16 else "cpu-int4pack-w4-group")
    x = make_input((5,), 256, torch.bfloat16)
    bound = INT4PACK_VS_FLOAT if runtime.kernel.name == "cpu-int4pack-w4-group" else output_tolerance(x.dtype, EXACT)
    assert rel_err(s.apply(runtime, x), reference(ckpt, x, g=g)) < bound


@pytest.mark.parametrize(
    ("g", "k", "n", "kernel", "ops", "weight_shape"),
    [
        (0, 64, 48, "npu-w4a8-dynamic", ["npu_convert_weight_to_int4pack", "npu_dynamic_quant", "npu_quant_matmul"],
         (64, 6)),
        (0, 128, 36, "npu-int8-dynamic", ["npu_format_cast", "npu_dynamic_quant", "npu_quant_matmul"], (128, 36)),
        (32, 64, 48, "npu-w4-group-antiquant", ["npu_convert_weight_to_int4pack", "npu_weight_quant_batchmatmul"],
         (64, 6)),
        (32, 128, 36, "npu-w4-group-antiquant", ["npu_weight_quant_batchmatmul"], (128, 36)),
    ],
)  # fmt: skip
def test_npu_path_calls_the_upstream_ops(npu, g, k, n, kernel, ops, weight_shape):
    s = scheme("npu", g)
    runtime = s.process_weights(checkpoint(k, n, g))
    assert runtime.kernel.name == kernel
    assert runtime["weight"].shape == weight_shape  # [K, N/8] int4 words, or int8 [K, N]
    if g:
        assert runtime["antiquant_scale"].shape == (k // g, n)
    s.apply(runtime, make_input((3,), k, torch.bfloat16))
    assert npu == ops


@pytest.mark.parametrize(("g", "n", "expected"), [
    (0, 48, "cpu-fbgemm-int8-dynamic-int4-weights"), (G, 48, "cpu-int4pack-w4-group"), (G, 36, "cpu-dequant-w4-group"),
])  # fmt: skip
def test_auto_prefers_the_fast_cpu_kernel(g, n, expected):
    assert scheme("auto", g).process_weights(checkpoint(128, n, g)).kernel.name == expected


def test_chooser_explains_an_impossible_backend():
    with pytest.raises(KernelUnavailableError, match="npu-w4-group-antiquant: torch_npu is not installed"):
        scheme("npu", G).process_weights(checkpoint(128, 48, G))


def test_zero_rows_give_zero_output(backend):
    for g in (0, G):
        s = scheme(backend, g)
        y = s.apply(s.process_weights(checkpoint(128, 48, g)), torch.zeros(3, 128))
        assert torch.equal(y, torch.zeros(3, 48))


def check_full_range_codes() -> None:
    """The int4-weights cpu kernel passes the full 8-bit codes in one fbgemm pass: exact because |w| ≤ 8 keeps
    every u8 × s8 pair sum ≤ 2 · 255 · 8 = 4080, far from int16's limit even on AVX2. Rows at codes ±127 against
    weights at -8 / +7 are that bound's worst case; a row's result is also independent of the batch."""
    k, n = 256, 48
    pattern = (torch.arange(n)[:, None] + torch.arange(k) // (torch.arange(n)[:, None] % 4 + 1)) % 2  # row-varied
    w4 = torch.where(pattern == 0, -8, 7)
    w4[0], w4[1] = -8, 7
    ckpt = with_scale_bias(dict(checkpoint(k, n), weight=pack_rows(w4)))
    x = torch.stack([torch.full((k,), 2.0), torch.full((k,), -2.0), make_input((), k, torch.float32)])
    x[2, 3] = 1e4  # a huge outlier: codes 127 and 0 (u8 255 next to 128)
    outs = {}
    for backend in ("cpu", "reference"):
        s = scheme(backend)
        runtime = s.process_weights(ckpt)
        outs[backend] = s.apply(runtime, x)
        if backend == "cpu":
            assert runtime.kernel.name == "cpu-fbgemm-int8-dynamic-int4-weights"
            assert torch.equal(torch.cat([s.apply(runtime, row[None]) for row in x]), outs["cpu"])
    # same codes and int32 sums; float32 epilogue rounding only (a few 2^-24 of the largest output)
    torch.testing.assert_close(outs["cpu"], outs["reference"], rtol=1e-6, atol=1e-6 * outs["cpu"].abs().max().item())
    assert rel_err(outs["cpu"], reference(ckpt, x)) < EXACT


@pytest.mark.parametrize("isa", ["native", "AVX2"])  # AVX2: vpmaddubsw, which would saturate with int8 weights
def test_int4_weight_cpu_kernel_is_exact_on_full_range_codes(isa):
    if isa == "native":
        check_full_range_codes()
    else:
        run_with_fbgemm_isa(isa, "test_w4a8_dynamic", "check_full_range_codes")


# --- quantize_weights ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "n"), EVEN_N_SHAPES)
@pytest.mark.parametrize("g", [0, G], ids=["per-channel", "per-group"])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(k, n, g, backend_name):
    # Per-channel int4 RTN: step = amax / 7 with amax ≤ 3.5σ for Gaussian rows of K ≤ 576, so the weight error is
    # ≤ 3.5 / 7 / √12 ≈ 14.4 % rms (msModelSlim measured 12.6 %); int8 activations add ≈ 0.7 %. Bound 0.16.
    # Two-step g64: group amax ≈ 2.4-3σ, so the int4 step is ≈ amax / 7 and the error ≈ 10-12 % rms (msModelSlim:
    # 10.7 %); integer second scales and bf16 int4pack add < 0.5 %. Bound 0.14.
    s = scheme(backend_name, g)
    weight = make_weight(n, k)
    tensors = s.quantize_weights(weight)
    specs = s.weight_specs(k, n, torch.bfloat16)
    assert set(tensors) == set(specs)
    quant_core.check_tensors(specs, tensors, "layer")
    floats = {name: t.dtype for name, t in tensors.items() if name not in ("weight", "weight_offset_second")}
    assert set(floats.values()) == {torch.float32}  # v1 layout
    x = make_input((16,), k, torch.float32)
    y = s.apply(s.process_weights(tensors), x)
    assert rel_err(y, x.double() @ weight.double().T) < (0.14 if g else 0.16)


@pytest.mark.parametrize("g", [0, G], ids=["per-channel", "per-group"])
@pytest.mark.parametrize("row_parallel", [False, True])
def test_quantize_writes_the_modelslim_layout(g, row_parallel):
    n, k = 96, 576
    weight = make_weight(n, k)
    tensors = scheme(g=g).quantize_weights(weight, row_parallel=row_parallel)
    w4 = unpack_rows(tensors["weight"])
    assert tensors["weight"].shape == (n // 2, k) and w4.abs().max() <= 8
    assert not tensors["weight_offset"].any()
    chunks = 16 if row_parallel else 1
    assert tensors["scale_bias"].shape == (n, chunks)
    expected = 8 * dequant(tensors, g).reshape(n, chunks, -1).sum(-1)
    assert torch.allclose(tensors["scale_bias"].double(), expected, rtol=1e-5, atol=1e-6)
    if g:
        second = tensors["weight_scale_second"]
        assert torch.equal(second, second.round()) and (second >= 1).all() and second.max() <= 17  # ceil(127 / 7.5)
        assert tensors["weight_offset_second"].dtype == torch.int64 and not tensors["weight_offset_second"].any()
        assert (unpack_rows(tensors["weight"]).double() * second.repeat_interleave(g, 1)).abs().max() <= 127 + 17 / 2
    # the weight error of the int4 grid itself (not the activations): see the round-trip bounds
    assert rel_err(dequant(tensors, g), weight) < (0.14 if g else 0.16)
    scheme(g=g).process_weights(tensors)  # its scale_bias passes the checksum


def test_row_parallel_option_sets_specs_and_quantizer_default():
    s = scheme(row_parallel=True)
    spec = s.weight_specs(256, 64, torch.bfloat16)["scale_bias"]
    assert spec.shape == (64, 16)
    assert spec.shard_shape("row", 4) == (64, 4) and spec.shard_shape("column", 2) == (32, 16)
    assert scheme().weight_specs(256, 64, torch.bfloat16)["scale_bias"].shard_shape("row", 4) == (64, 1)
    assert s.quantize_weights(make_weight(64, 256))["scale_bias"].shape == (64, 16)
    assert s.quantize_weights(make_weight(64, 256), row_parallel=False)["scale_bias"].shape == (64, 1)


# --- scale_bias: validated, not used -------------------------------------------------------------------------
@pytest.mark.parametrize("g", [0, G], ids=["per-channel", "per-group"])
def test_both_scale_bias_forms_load_and_give_the_same_output(g):
    x = make_input((4,), 256, torch.float32)
    outputs = []
    for chunks in (1, 16, 4):  # column-parallel, row-parallel, a tp=4 rank's slice of the row-parallel form
        ckpt = checkpoint(256, 48, g, chunks)
        assert ckpt["scale_bias"].shape == (48, chunks)
        s = scheme(g=g)
        outputs.append(s.apply(s.process_weights(ckpt), x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_scale_bias_in_bf16_passes_the_checksum():
    ckpt = checkpoint(256, 48, chunks=16)
    ckpt["scale_bias"] = ckpt["scale_bias"].bfloat16()
    scheme().process_weights(ckpt)


def swap_nibbles(ckpt):
    u = ckpt["weight"].view(torch.uint8)
    ckpt["weight"] = ((u >> 4) | (u << 4)).view(torch.int8)


@pytest.mark.parametrize("g", [0, G], ids=["per-channel", "per-group"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c["scale_bias"].__setitem__((3, 0), float("nan")), r"'L\.scale_bias' contains NaN or Inf"),
        (lambda c: c["scale_bias"].__setitem__((3, 0), float("inf")), r"'L\.scale_bias' contains NaN or Inf"),
        (lambda c: c.update(scale_bias=torch.zeros(48, 3)), r"'L\.scale_bias' has shape \(48, 3\), expected \(48, 1\)"),
        (lambda c: c.update(scale_bias=torch.zeros(46, 1)), r"expected \(48, 1\) \(column-parallel.*\(48, 16"),
        (lambda c: c.update(scale_bias=torch.zeros(48)), r"'L\.scale_bias' has shape \(48,\)"),
        (lambda c: c.update(scale_bias=torch.zeros(48, 1, dtype=torch.int32)), r"'L\.scale_bias' has dtype tor"),
        (lambda c: c["scale_bias"].mul_(2), r"'L\.scale_bias' does not match the weights"),
        (lambda c: c["scale_bias"].mul_(1 / 8), r"'L\.scale_bias' does not match the weights"),
        (lambda c: c.update(scale_bias=c["scale_bias"].flip(0)), r"does not match the weights"),
        (swap_nibbles, r"does not match the weights.*verify_scale_bias=False"),
        (lambda c: c.pop("scale_bias"), r"'L' is missing L\.scale_bias"),
    ],
)  # fmt: skip
def test_corrupted_scale_bias_is_named(g, change, match):
    ckpt = checkpoint(128, 48, g)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme(g=g).process_weights(ckpt, layer="L")


def test_verify_scale_bias_can_be_turned_off_but_not_the_finite_check():
    ckpt = checkpoint(128, 48)
    swap_nibbles(ckpt)  # a producer with the other nibble order: loads, and computes with this scheme's order
    s = scheme(verify_scale_bias=False)
    x = make_input((3,), 128, torch.float32)
    assert rel_err(s.apply(s.process_weights(ckpt), x), reference(ckpt, x)) < EXACT
    ckpt["scale_bias"][0, 0] = float("nan")
    with pytest.raises(CheckpointTensorError, match="NaN"):
        s.process_weights(ckpt)


def test_row_parallel_scale_bias_needs_k_divisible_by_16():
    ckpt = checkpoint(72, 48, chunks=1)
    ckpt["scale_bias"] = torch.zeros(48, 16)
    with pytest.raises(CheckpointTensorError, match=r"'L\.scale_bias' has 16 columns .* in_features 72"):
        scheme().process_weights(ckpt, layer="L")


# --- v0 / v1 variants ----------------------------------------------------------------------------------------
def test_v0_dtypes_are_accepted():
    ckpt = checkpoint(128, 48, G, chunks=16)
    v0 = dict(
        ckpt,
        weight_scale=ckpt["weight_scale"].bfloat16(),
        weight_offset=ckpt["weight_offset"].bfloat16(),
        weight_scale_second=ckpt["weight_scale_second"].bfloat16(),  # integers ≤ 18: exact in bf16
        weight_offset_second=ckpt["weight_offset_second"].float(),
    )
    x = make_input((4,), 128, torch.float32)
    y = scheme(g=G).apply(scheme(g=G).process_weights(v0), x)
    assert rel_err(y, reference(dict(ckpt, weight_scale=v0["weight_scale"].float()), x, g=G)) < EXACT


@pytest.mark.parametrize("g", [0, G], ids=["per-channel", "per-group"])
def test_offsets_are_optional(g):
    ckpt = checkpoint(128, 48, g)
    del ckpt["weight_offset"]
    ckpt.pop("weight_offset_second", None)
    scheme(g=g).process_weights(ckpt)


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("g", "change", "match"),
    [
        (0, lambda c: c.update(weight=unpack_rows(c["weight"]).to(torch.int8)), r"L\.weight has shape \(48, 128\), "
         r"as many rows as weight_scale: one int4 value per byte"),
        (0, lambda c: c.update(weight=c["weight"][:12]), r"'L\.weight_scale' has shape \(48, 1\), expected \(24, 1\)"),
        (0, lambda c: c.update(weight=c["weight"].view(torch.uint8)), r"'L\.weight' has dtype torch\.uint8"),
        (0, lambda c: c.update(weight_scale=torch.ones(48)), r"'L\.weight_scale' has shape \(48,\), expected \(48, 1"),
        (0, lambda c: c["weight_scale"].__setitem__((3, 0), float("nan")), r"'L\.weight_scale' contains NaN"),
        (0, lambda c: c["weight_scale"].__setitem__((5, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative"),
        (0, lambda c: c["weight_offset"].__setitem__((0, 0), 1.0), r"L\.weight_offset is non-zero"),
        (0, lambda c: c.pop("weight_scale"), r"'L' is missing L\.weight_scale"),
        (0, lambda c: c.update(weight=c["weight"][None]), r"weight must be 2-D"),
        (0, lambda c: c.update(weight_scale_second=torch.ones(48, 2)), r"has weight_scale_second.*group_size=64"),
        (G, lambda c: c["weight_scale_second"].__setitem__((1, 1), 0.0), r"'L\.weight_scale_second' has 1 zero"),
        (G, lambda c: c["weight_scale_second"].__setitem__((1, 1), -2.0), r"'L\.weight_scale_second' has 1 zero"),
        (G, lambda c: c["weight_scale_second"].__setitem__((1, 1), float("inf")), r"'L\.weight_scale_second' cont"),
        (G, lambda c: c["weight_offset_second"].__setitem__((2, 0), 3), r"L\.weight_offset_second is non-zero"),
        (G, lambda c: c.update(weight_scale_second=torch.ones(48, 4)), r"'L\.weight_scale_second' has shape \(48, 4\)"
         r", expected \(48, 2\).*group_size"),
        (G, lambda c: c.pop("weight_scale_second"), r"'L' is missing L\.weight_scale_second"),
        (G, lambda c: c.update(weight_offset_second=torch.zeros(48, 2, dtype=torch.int32)), r"has dtype torch\.int32"),
    ],
)  # fmt: skip
def test_bad_checkpoint_tensors_are_named(g, change, match):
    ckpt = checkpoint(128, 48, g)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        scheme(g=g).process_weights(ckpt, layer="L")


def test_group_size_not_dividing_k_is_a_clear_error():
    ckpt = checkpoint(128, 48, 32)
    with pytest.raises(CheckpointTensorError, match=r"layer 'L': group_size 48 does not divide in_features 128.*"
                                                     r"description's group_size"):  # fmt: skip
        scheme(g=48).process_weights(ckpt, layer="L")
    with pytest.raises(CheckpointTensorError, match="group_size 48 does not divide in_features 128"):
        scheme(g=48).weight_specs(128, 48, torch.bfloat16)
    with pytest.raises(CheckpointTensorError, match="group_size 48 does not divide in_features 128"):
        scheme(g=48).quantize_weights(make_weight(48, 128))


def test_odd_out_features_are_impossible():
    with pytest.raises(CheckpointTensorError, match=r"out_features must be even, got 33.*W8A8_DYNAMIC"):
        scheme().weight_specs(96, 33, torch.bfloat16)
    with pytest.raises(CheckpointTensorError, match="out_features must be even, got 33"):
        scheme(g=32).quantize_weights(make_weight(33, 96))


def test_row_parallel_quantize_needs_k_divisible_by_16():
    with pytest.raises(CheckpointTensorError, match=r"in_features 72 does not divide by it.*row_parallel=False"):
        scheme().quantize_weights(make_weight(48, 72), row_parallel=True)


def test_apply_rejects_wrong_input_width():
    s = scheme(g=G)
    runtime = s.process_weights(checkpoint(128, 48, G))
    with pytest.raises(ValueError, match="last dim 128"):
        s.apply(runtime, torch.randn(2, 129))
