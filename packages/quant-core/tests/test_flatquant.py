"""W4A4_FLATQUANT_DYNAMIC, W8A8_FLATQUANT_DYNAMIC and W4A8_FLATQUANT_DYNAMIC: a Kronecker transform of each token,
then the inner per-token scheme. References are float64 and use ``x · kron(L, R)`` for the transform, a different
formulation from the kernels' ``Lᵀ · X · R``."""

import pytest
import torch
from linear_cases import ACT_DTYPES, BATCH_SHAPES, SHAPES, make_input, make_weight, output_tolerance, rel_err
from tie_reference import excess_err, fake_quant_with_ties, linear_with_slack, unpack_int4_pairs

import quant_core
from quant_core import CheckpointTensorError
from quant_core.kernels import KernelUnavailableError
from quant_core.kernels.flatquant import kronecker_transform
from quant_core.schemes._flatquant import fold_inverse_transform

W4A4, W8A8, W4A8 = "W4A4_FLATQUANT_DYNAMIC", "W8A8_FLATQUANT_DYNAMIC", "W4A8_FLATQUANT_DYNAMIC"
SCHEMES = [W4A4, W8A8, W4A8]
CASES = [(q, k, n) for q in SCHEMES for k, n in SHAPES if q != W4A8 or n % 2 == 0]  # W4A8 packs pairs along N
# get_decompose_dim for the test shapes (modelslim-format §5.7 rule, worked out by hand: 96 = 10² - 2² -> (8, 12)).
DECOMPOSE = {64: (8, 8), 576: (24, 24), 96: (8, 12), 256: (16, 16)}

# Exact backends (reference; cpu, whose int8 inner takes the spec's own codes, see test_w8a8_dynamic.py; npu with
# float32 x): integer arithmetic; beyond the near-tie slack (tie_reference.py) only float32 rounding of the
# transform and epilogue (~1e-6) remains. 1e-4 catches any real mistake (a transposed factor is ≥ 0.5).
EXACT = 1e-4
# npu int8 inner with bf16 x: the transformed activations go back to bf16 before npu_dynamic_quant (it takes
# fp16/bf16). That rounding (≤ 2^-9 relative, ≈ 0.03 of an int8 step on average) flips ≈ 3-4 % of the x_q by one
# step, an rms change of step·√0.035 ≈ 0.5 % of the output; plus bf16 output rounding (≈ 0.1 %). 1.5e-2 = 2.5x.
NPU_BF16_INT8 = 1.5e-2


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Values the NPU path's cast to the activation dtype leaves unchanged, so every backend sees the same matrix."""
    return t.bfloat16().float()


def random_transform(d: int, g: torch.Generator, orthogonal: bool = False) -> torch.Tensor:
    if orthogonal:  # Haar-distributed
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float().contiguous()
    # general invertible: singular values of 0.3·G/√d lie in [0, 0.6], so those of I + that in [0.4, 1.6]
    return torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5


def pack_pairs(values: torch.Tensor) -> torch.Tensor:
    """int4 values [N, K] -> ModelSlim int8 [N/2, K] (row 2j low nibble, 2j+1 high nibble)."""
    v = values.to(torch.int64) & 0xF
    byte = v[0::2] | (v[1::2] << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def checkpoint(quant_type, k, n, *, left_dim=None, right=True, clip=0.9, seed=1):
    """A v1 checkpoint as msModelSlim writes it (float32 transforms and scales, zero offsets). clip = 0.9 also
    shows that the int8 schemes ignore it (their reference below would not match otherwise)."""
    g = torch.Generator().manual_seed(seed)
    a = left_dim or DECOMPOSE[k][0]
    if quant_type == W8A8:
        weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        weight = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    ckpt = {"weight_scale": scale, "weight_offset": torch.zeros(n, 1), "clip_ratio": torch.tensor([clip])}
    ckpt["left_trans"] = bf16_exact(random_transform(a, g))
    if right:
        ckpt["right_trans"] = bf16_exact(random_transform(k // a, g))
    if quant_type == W4A8:
        ckpt["weight"] = pack_pairs(weight)
        ckpt["scale_bias"] = 8 * (weight.float() * scale).sum(-1, keepdim=True)
    else:
        ckpt["weight"] = weight
    return ckpt


def dequantized_weight(quant_type, ckpt) -> torch.Tensor:
    w = unpack_int4_pairs(ckpt["weight"]) if quant_type == W4A8 else ckpt["weight"]
    return w.double() * ckpt["weight_scale"].double()


def transformed(ckpt, x) -> torch.Tensor:
    """float64 ``x · kron(left_trans, right_trans)`` (identity right factor when absent)."""
    left = ckpt["left_trans"].double().contiguous()
    k = x.shape[-1]
    right = ckpt["right_trans"].double() if "right_trans" in ckpt else torch.eye(k // left.shape[0]).double()
    return x.double() @ torch.kron(left, right.contiguous())


def reference(quant_type, ckpt, x, bias=None, act_quant=True):
    """float64 spec: transform, then int4 (clip_ratio-scaled) or plain int8 per-token fake quantization."""
    w = dequantized_weight(quant_type, ckpt)
    xt = transformed(ckpt, x)
    if not act_quant:
        return linear_with_slack(xt, torch.zeros_like(xt), w, bias)
    qmax, clip = (7, ckpt["clip_ratio"].item()) if quant_type == W4A4 else (127, 1.0)
    return linear_with_slack(*fake_quant_with_ties(xt, qmax, clip), w, bias)


def check_output(quant_type, backend, ckpt, x, y, bias=None):
    k, n = x.shape[-1], y.shape[-1]
    x, y = x.reshape(-1, k), y.reshape(-1, n)
    if backend == "npu" and quant_type != W4A4 and x.dtype == torch.bfloat16:
        err, bound = rel_err(y, reference(quant_type, ckpt, x, bias)[0]), NPU_BF16_INT8
    else:
        err, bound = excess_err(y, *reference(quant_type, ckpt, x, bias)), output_tolerance(x.dtype, EXACT)
    assert err < bound, f"{quant_type} {backend}: rel err {err:.2e} ≥ {bound:.0e}"


# --- apply vs the float64 spec -------------------------------------------------------------------------------
@pytest.mark.parametrize(("quant_type", "k", "n"), CASES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_apply_matches_float64_reference(backend, quant_type, k, n, batch, dtype):
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend, version="1.0.0")
    ckpt = checkpoint(quant_type, k, n)
    if backend == "npu" and quant_type == W4A4 and DECOMPOSE[k][1] % 8:
        with pytest.raises(KernelUnavailableError, match=f"b={DECOMPOSE[k][1]} % 8 != 0"):
            scheme.process_weights(ckpt)
        return
    runtime = scheme.process_weights(ckpt, layer="model.layers.0.mlp.down_proj")
    x = make_input(batch, k, dtype)
    bias = torch.randn(n).to(dtype)
    y = scheme.apply(runtime, x, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    check_output(quant_type, backend, ckpt, x, y, bias)


@pytest.mark.parametrize("quant_type", [W8A8, W4A8])
def test_o_proj_has_only_a_head_sized_left_trans(backend, quant_type):
    # msModelSlim's o_proj: left_trans [num_heads, num_heads], no right_trans; X = x.view(heads, K/heads).
    k, n, heads = 64, 48, 4
    ckpt = checkpoint(quant_type, k, n, left_dim=heads, right=False)
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend, left_dim=heads, has_right_trans=False)
    quant_core.check_tensors(scheme.weight_specs(k, n, torch.bfloat16), ckpt, "o_proj")
    x = make_input((5,), k, torch.float32)
    y = scheme.apply(scheme.process_weights(ckpt), x)
    check_output(quant_type, backend, ckpt, x, y)
    # The defaults (get_decompose_dim: 8 x 8 with a right factor) do not fit, but the checkpoint's shapes win.
    default = quant_core.get_scheme(quant_type, "linear", backend=backend)
    assert torch.equal(default.apply(default.process_weights(ckpt), x), y)


def test_checkpoint_dims_other_than_the_default_decomposition_are_read():
    ckpt = checkpoint(W4A4, 256, 32, left_dim=8)  # 8 x 32 instead of get_decompose_dim's 16 x 16
    scheme = quant_core.get_scheme(W4A4, "linear", backend="reference")
    x = make_input((3,), 256, torch.float32)
    assert excess_err(scheme.apply(scheme.process_weights(ckpt), x), *reference(W4A4, ckpt, x)) < EXACT


def test_npu_kronecker_path_calls_the_upstream_ops_in_chunks(npu, monkeypatch):
    monkeypatch.setattr("quant_core.kernels.flatquant.NPU_KRONECKER_MAX_TOKENS", 4)
    ckpt = checkpoint(W4A4, 64, 48)
    scheme = quant_core.get_scheme(W4A4, "linear", backend="npu")
    runtime = scheme.process_weights(ckpt)
    assert runtime.kernel.name == "npu-kronecker-int4"
    assert torch.equal(runtime["left_trans"], ckpt["left_trans"].T)  # upstream passes it transposed
    assert runtime["weight_packed"].shape == (48, 8) and runtime["weight_packed"].dtype == torch.int32
    x = make_input((10,), 64, torch.bfloat16)
    check_output(W4A4, "npu", ckpt, x, scheme.apply(runtime, x))
    assert npu == ["npu_convert_weight_to_int4pack"] + ["npu_kronecker_quant", "npu_quant_matmul"] * 3


@pytest.mark.parametrize("quant_type", [W8A8, W4A8])
def test_npu_int8_path_calls_the_upstream_ops(npu, quant_type):
    scheme = quant_core.get_scheme(quant_type, "linear", backend="npu")
    runtime = scheme.process_weights(checkpoint(quant_type, 64, 48))
    assert runtime["weight"].shape == (64, 48) and runtime["weight"].dtype == torch.int8  # [K, N], int4 unpacked
    scheme.apply(runtime, make_input((3,), 64, torch.bfloat16))
    assert npu == ["npu_format_cast", "npu_dynamic_quant", "npu_quant_matmul"]


@pytest.mark.parametrize("quant_type", SCHEMES)
def test_v0_model_dtype_scales_and_transforms_are_accepted(quant_type):
    ckpt = checkpoint(quant_type, 64, 48)
    v0 = {name: t.bfloat16() if t.is_floating_point() else t for name, t in ckpt.items()}
    rounded = {name: t.float() if t.is_floating_point() else t for name, t in v0.items()}
    scheme = quant_core.get_scheme(quant_type, "linear", backend="reference", version="0")
    x = make_input((4,), 64, torch.float32)
    assert excess_err(scheme.apply(scheme.process_weights(v0), x), *reference(quant_type, rounded, x)) < EXACT


@pytest.mark.parametrize("quant_type", SCHEMES)
def test_zero_rows_give_zero_output(backend, quant_type):
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend)
    y = scheme.apply(scheme.process_weights(checkpoint(quant_type, 64, 48)), torch.zeros(3, 64))
    assert torch.equal(y, torch.zeros(3, 48))


# --- the transform and folding, without quantization ---------------------------------------------------------
@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize(("a", "b"), [(8, 8), (8, 12), (4, None)])
def test_folded_weight_leaves_a_float_layer_unchanged(orthogonal, a, b):
    # x · (L ⊗ R) · W'ᵀ = x · Wᵀ with W' = W · (L ⊗ R)^-T; (4, None) is o_proj's left-only form with K = 64.
    g = torch.Generator().manual_seed(3)
    k = a * (b or 16)
    left = random_transform(a, g, orthogonal)
    right = None if b is None else random_transform(b, g, orthogonal)
    weight, x = make_weight(40, k), make_input((6,), k, torch.float32)
    xt = kronecker_transform(x, left, right)
    kron = torch.kron(left.double(), (torch.eye(k // a) if right is None else right).double())
    assert torch.allclose(xt.double(), x.double() @ kron, atol=1e-5)  # the reshape form is x · (L ⊗ R)
    folded = fold_inverse_transform(weight, left, right)
    assert torch.allclose(folded.double() @ kron.T, weight.double(), atol=1e-5)  # W' (L ⊗ R)ᵀ = W
    # float32 everywhere; condition numbers ≤ 4 per factor keep the relative error ~1e-6
    assert rel_err(xt @ folded.T, x.double() @ weight.double().T) < 1e-5


@pytest.mark.parametrize("quant_type", SCHEMES)
@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_quantize_process_apply_round_trip(quant_type, orthogonal, backend_name):
    # Bounds from the grids (Gaussian rows, K = 576): int8 per-channel weights and per-token int8 activations
    # ≈ 0.7 % each (on every backend), so W8A8 ≈ 1 % -> 3e-2 as for W8A8_DYNAMIC. int4 per-channel weights: step
    # amax/7 ≈ 0.45 σ, rms step/√12 ≈ 13 %; W4A8 ≈ 13 % -> 0.2; W4A4 adds int4 activations (another ≈ 13 %, in
    # quadrature ≈ 19 %) -> 0.28. The transforms keep Gaussian inputs Gaussian-like.
    k, n = 576, 96
    g = torch.Generator().manual_seed(5)
    left, right = random_transform(24, g, orthogonal), random_transform(24, g, orthogonal)
    scheme = quant_core.get_scheme(quant_type, "linear", backend=backend_name)
    weight = make_weight(n, k)
    tensors = scheme.quantize_weights(weight, left_trans=left, right_trans=right, clip_ratio=torch.tensor([1.0]))
    quant_core.check_tensors(scheme.weight_specs(k, n, torch.bfloat16), tensors, "layer")
    assert all(t.dtype == torch.float32 for name, t in tensors.items() if name != "weight")  # v1 layout
    x = make_input((16,), k, torch.float32)
    err = rel_err(scheme.apply(scheme.process_weights(tensors), x), x.double() @ weight.double().T)
    bound = {W4A4: 0.28, W4A8: 0.2, W8A8: 3e-2}[quant_type]
    assert err < bound


def test_o_proj_quantize_writes_left_trans_only():
    scheme = quant_core.get_scheme(W8A8, "linear", backend="reference", left_dim=4, has_right_trans=False)
    weight, left = make_weight(48, 64), random_transform(4, torch.Generator().manual_seed(2))
    tensors = scheme.quantize_weights(weight, left_trans=left)
    assert "right_trans" not in tensors and tensors["clip_ratio"].tolist() == [1.0]
    quant_core.check_tensors(scheme.weight_specs(64, 48, torch.bfloat16), tensors, "o_proj")
    x = make_input((8,), 64, torch.float32)
    assert rel_err(scheme.apply(scheme.process_weights(tensors), x), x.double() @ weight.double().T) < 3e-2


def test_the_transform_tames_outlier_channels():
    # Three channels 10x larger set amax ≈ 30 σ, so the int4 step (≈ 4 σ) rounds almost every other channel to 0:
    # about half of the output energy is lost (error ≈ 0.45). A random orthogonal Kronecker transform spreads the
    # outliers over all channels (the point of FlatQuant), back to the ≈ 19 % of Gaussian inputs (round-trip test).
    # Identity transforms reduce to W4A4_DYNAMIC exactly.
    k, n = 256, 64
    g = torch.Generator().manual_seed(0)
    weight, x = make_weight(n, k), make_input((16,), k, torch.float32)
    x[:, [3, 100, 200]] *= 10
    ref = x.double() @ weight.double().T

    def err(quant_type, **calibration):
        scheme = quant_core.get_scheme(quant_type, "linear", backend="reference")
        return rel_err(scheme.apply(scheme.process_weights(scheme.quantize_weights(weight, **calibration)), x), ref)

    plain = err("W4A4_DYNAMIC")
    assert err(W4A4) == pytest.approx(plain, rel=1e-6)
    flat = err(W4A4, left_trans=random_transform(16, g, True), right_trans=random_transform(16, g, True))
    assert flat < 0.25 < 0.4 < plain


def test_w4a8_scale_bias_is_written_as_msmodelslim_does():
    weight = make_weight(48, 64)
    for row_parallel, cols in ((False, 1), (True, 16)):
        scheme = quant_core.get_scheme(W4A8, "linear", backend="reference", row_parallel=row_parallel)
        t = scheme.quantize_weights(weight)
        w_deq = unpack_int4_pairs(t["weight"]).double() * t["weight_scale"].double()
        assert t["scale_bias"].shape == (48, cols)
        expected = 8 * w_deq.reshape(48, cols, 64 // cols).sum(-1)
        assert torch.allclose(t["scale_bias"].double(), expected, atol=1e-5)
        for option in (False, True):  # process_weights takes the shape the checkpoint has, whatever the option
            quant_core.get_scheme(W4A8, "linear", row_parallel=option).process_weights(t)


# --- shapes: get_decompose_dim and options -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "dims"),
    [(256, (16, 16)), (512, (16, 32)), (576, (24, 24)), (1536, (32, 48)), (2048, (32, 64)), (4096, (64, 64)),
     (5632, (64, 88)), (11008, (86, 128)), (14336, (112, 128))],
)  # fmt: skip
@pytest.mark.parametrize("quant_type", SCHEMES)
def test_default_transform_shapes_follow_the_format_table(quant_type, k, dims):
    specs = quant_core.get_scheme(quant_type, "linear").weight_specs(k, 64, torch.bfloat16)
    assert specs["left_trans"].shape == (dims[0],) * 2 and specs["right_trans"].shape == (dims[1],) * 2
    assert specs["clip_ratio"].shape == (1,) and specs["clip_ratio"].dtype == torch.float32
    assert specs["left_trans"].sharding("row") is quant_core.Sharding.REPLICATED


@pytest.mark.parametrize("quant_type", SCHEMES)
def test_clip_ratio_is_math_only_for_int4_activations(quant_type):
    # int8 FlatQuant ignores clip_ratio, so fused shards may disagree on it (msModelSlim learns one per linear)
    specs = quant_core.get_scheme(quant_type, "linear").weight_specs(256, 64, torch.bfloat16)
    validated_only = {name for name, spec in specs.items() if spec.validated_only}
    assert validated_only == (set() if quant_type == "W4A4_FLATQUANT_DYNAMIC" else {"clip_ratio"})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="always has a right_trans"):
        quant_core.get_scheme(W4A4, "linear", has_right_trans=False)
    with pytest.raises(ValueError, match="left_dim must be a positive integer"):
        quant_core.get_scheme(W8A8, "linear", left_dim=0)
    with pytest.raises(CheckpointTensorError, match="left_dim 5 does not divide in_features 64"):
        quant_core.get_scheme(W8A8, "linear", left_dim=5).weight_specs(64, 48, torch.bfloat16)
    with pytest.raises(CheckpointTensorError, match="out_features must be even; got 33"):
        quant_core.get_scheme(W4A8, "linear").weight_specs(96, 33, torch.bfloat16)
    with pytest.raises(CheckpointTensorError, match="out_features must be even; got 33"):
        quant_core.get_scheme(W4A8, "linear").quantize_weights(make_weight(33, 96))


@pytest.mark.parametrize(
    ("quant_type", "change", "match"),
    [
        (W8A8, lambda c: c.update(left_trans=torch.eye(8)[:, :4]), r"L\.left_trans has shape \(8, 4\), expected a"),
        (W8A8, lambda c: c.update(left_trans=torch.eye(5)), r"a dividing in_features 64"),
        (W4A4, lambda c: c.update(right_trans=torch.eye(16)), r"'L\.right_trans' has shape \(16, 16\), expected \(8,"),
        (W4A4, lambda c: c.pop("right_trans"), r"'L' is missing L\.right_trans"),
        (W8A8, lambda c: c.pop("left_trans"), r"'L' is missing L\.left_trans"),
        (W4A8, lambda c: c.pop("clip_ratio"), r"'L' is missing L\.clip_ratio"),
        (W8A8, lambda c: c["left_trans"].__setitem__((1, 2), float("nan")), r"'L\.left_trans' contains NaN or Inf"),
        (W4A8, lambda c: c["right_trans"].__setitem__((0, 0), float("inf")), r"'L\.right_trans' contains NaN"),
        (W4A4, lambda c: c.update(clip_ratio=torch.tensor([0.0])), r"'L\.clip_ratio' has 1 zero or negative"),
        (W8A8, lambda c: c.update(clip_ratio=torch.tensor([float("nan")])), r"'L\.clip_ratio' contains NaN"),
        (W8A8, lambda c: c.update(clip_ratio=torch.ones(2)), r"'L\.clip_ratio' has shape \(2,\), expected \(1,\)"),
        (W4A4, lambda c: c["weight"].__setitem__((0, 0), 9), r"L\.weight holds values outside the int4 range"),
        (W4A4, lambda c: c["weight_scale"].__setitem__((1, 0), 0.0), r"'L\.weight_scale' has 1 zero or negative"),
        (W8A8, lambda c: c["weight_offset"].__setitem__((0, 0), 3.0), r"L\.weight_offset is non-zero"),
        (W4A8, lambda c: c.update(weight=unpack_int4_pairs(c["weight"]).to(torch.int8)),
         r"'L\.weight_scale' has shape \(48, 1\), expected \(96, 1\)"),
        (W4A8, lambda c: c.update(scale_bias=torch.zeros(48, 3)), r"'L\.scale_bias' has shape \(48, 3\)"),
        (W4A8, lambda c: c["scale_bias"].__setitem__((0, 0), float("nan")), r"'L\.scale_bias' contains NaN"),
        (W8A8, lambda c: c.update(deq_scale=torch.ones(48)), r"does not use: L\.deq_scale"),
    ],
)  # fmt: skip
def test_bad_checkpoint_tensors_are_named(quant_type, change, match):
    ckpt = checkpoint(quant_type, 64, 48)
    change(ckpt)
    with pytest.raises(CheckpointTensorError, match=match):
        quant_core.get_scheme(quant_type, "linear").process_weights(ckpt, layer="L")


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        ({"left_trans": torch.eye(6)}, r"calibration left_trans has shape \(6, 6\), expected \[a, a\] with a dividing"),
        ({"right_trans": torch.eye(4)}, r"calibration right_trans has shape \(4, 4\), expected \[8, 8\]"),
        ({"left_trans": torch.zeros(8, 8)}, r"singular"),
        ({"right_trans": torch.full((8, 8), float("nan"))}, r"calibration right_trans contains NaN"),
        ({"clip_ratio": 0.0}, r"clip_ratio must be a positive finite number"),
    ],
)
def test_bad_calibration_is_refused(calibration, match):
    with pytest.raises(CheckpointTensorError, match=match):
        quant_core.get_scheme(W4A4, "linear").quantize_weights(make_weight(48, 64), **calibration)


def test_auto_picks_the_cpu_kernels():
    for quant_type, name in ((W4A4, "cpu-fbgemm-flatquant-int4"), (W8A8, "cpu-fbgemm-flatquant-int8")):
        runtime = quant_core.get_scheme(quant_type, "linear").process_weights(checkpoint(quant_type, 64, 48))
        assert runtime.kernel.name == name
