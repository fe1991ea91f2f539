"""Property-based tests (hypothesis, derandomized: the same examples on every run).

* Description lookup: for any description / prefix / packed-module table / optional shards, ``quant_type_for`` either
  answers what the rules of modelslim-format.md §3.2-3.3 say (an oracle written here from the spec) or raises our
  error; renaming every key (vLLM's ``hf_to_vllm_mapper``) changes nothing; a fused layer's type is its shards' type.
* Description parsing: any JSON value (or any bytes on disk) gives a description or a ``DescriptionError``.
* Every scheme's quantize -> process -> apply round trip over random shapes and weight / activation scales stays
  within the float-reference bound of that scheme's own round-trip test (bounds reused, not loosened).
"""

import contextlib
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quant_core
from quant_core.description import FILE_KEYS, QuantDescription
from quant_core.errors import DescriptionError, LayerLookupError, MixedShardsError
from quant_core.lookup import DEFAULT_EXPERT_SHARDS
from quant_core.primitives import get_decompose_dim

FAST = settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(derandomize=True, max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- description lookup --------------------------------------------------------------------------------------------
PARENTS = ("model.layers.0.self_attn", "model.layers.1.mlp", "model.layers.1.mlp.experts.0", "")
SHARD_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "o_proj")
FUSED_NAMES = ("qkv_proj", "gate_up_proj", "experts", "fused")
TYPES = ("FLOAT", "W8A8_DYNAMIC", "W8A16")


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


module_names = st.builds(_join, st.sampled_from(PARENTS), st.sampled_from((*SHARD_NAMES, "experts.0.gate_proj")))
descriptions = st.dictionaries(
    st.builds(lambda m, s: f"{m}.{s}", module_names, st.sampled_from(("weight", "weight_scale"))),
    st.sampled_from(TYPES),
    max_size=14,
)
tables = st.dictionaries(st.sampled_from(FUSED_NAMES), st.lists(st.sampled_from(SHARD_NAMES), max_size=3), max_size=3)
prefixes = st.one_of(
    st.builds(_join, st.sampled_from(PARENTS), st.sampled_from(SHARD_NAMES + FUSED_NAMES)),
    st.text(alphabet="abq_.0", max_size=16),  # arbitrary text: still only an answer or our error
)


def oracle(entries, prefix, kind, table, optional):
    """modelslim-format.md §3.2-3.3, written from the spec: the type (None = FLOAT) or the error class."""
    parent, _, proj = prefix.rpartition(".")
    shards = table.get(proj) or (list(DEFAULT_EXPERT_SHARDS) if kind == "moe" and proj == "experts" else None)
    if shards:
        found = {s: entries[_join(parent, s) + ".weight"] for s in shards if _join(parent, s) + ".weight" in entries}
        missing = [s for s in shards if s not in found and s not in optional.get(proj, ())]
        if missing or not found:
            return LayerLookupError
        if len(set(found.values())) > 1:
            return MixedShardsError
        qtype = next(iter(found.values()))
    elif prefix + ".weight" in entries:
        qtype = entries[prefix + ".weight"]
    elif prefix == "lm_head" and "language_model.lm_head.weight" in entries:
        qtype = entries["language_model.lm_head.weight"]
    elif any(k.startswith(prefix + ".") and k.endswith(".weight") and v == "FLOAT" for k, v in entries.items()):
        qtype = "FLOAT"
    else:
        return LayerLookupError
    return None if qtype == "FLOAT" else qtype


def outcome(desc, prefix, kind, table, optional):
    try:
        return desc.quant_type_for(prefix, kind, table, optional_shards=optional)
    except (LayerLookupError, MixedShardsError) as e:  # any other exception fails the test
        return type(e)


@FAST
@given(descriptions, prefixes, st.sampled_from(("linear", "moe")), tables,
       st.dictionaries(st.sampled_from(FUSED_NAMES), st.lists(st.sampled_from(SHARD_NAMES), max_size=2)))  # fmt: skip
def test_lookup_resolves_as_the_spec_says_or_raises_our_error(entries, prefix, kind, table, optional):
    desc = QuantDescription.from_dict(entries)
    got = outcome(desc, prefix, kind, table, optional)
    assert got == oracle(desc.entries, prefix, kind, table, optional)
    # vLLM's WeightsMapper (e.g. multimodal models' "language_model." prefix) renames keys and prefixes alike.
    renamed = desc.with_renamed_keys(lambda key: "language_model." + key)
    if prefix != "lm_head":  # lm_head has its own fallback to language_model.lm_head
        assert outcome(renamed, "language_model." + prefix, kind, table, optional) == got


@FAST
@given(descriptions, st.sampled_from(PARENTS[:3]), tables)
def test_a_fused_layer_has_its_shards_type(entries, parent, table):
    desc = QuantDescription.from_dict(entries)
    for fused, shards in table.items():
        got = outcome(desc, _join(parent, fused), "linear", table, {})
        if isinstance(got, type) or not shards:
            continue
        for shard in shards:  # each shard on its own (not a key of the table) resolves to the same type
            if shard not in table:
                assert outcome(desc, _join(parent, shard), "linear", {}, {}) == got


# --- description parsing ---------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)
KEYS = st.sampled_from(["version", "group_size", "model_quant_type", "optional", "metadata", "kv_cache_type",
                        "is_rot_used", "hc_head_fn", "a.weight", "b.c.weight_scale", "x"])  # fmt: skip
raw_descriptions = st.dictionaries(KEYS | st.text(max_size=10), json_values | st.sampled_from(TYPES), max_size=8)
quarot = st.fixed_dictionaries({"quarot": st.fixed_dictionaries({"global_rotation": json_values})})


@FAST
@given(raw_descriptions | json_values, st.none() | st.sets(KEYS, max_size=3), st.none() | quarot)
def test_any_json_gives_a_description_or_our_error(data, tensor_names, optional):
    if optional is not None and isinstance(data, dict):
        data = {**data, "optional": optional}
    try:
        desc = QuantDescription.from_dict(data, tensor_names=tensor_names)
    except DescriptionError:
        return
    assert all(isinstance(v, str) and v for v in desc.entries.values())
    assert set(desc.files) <= set(FILE_KEYS) and all(isinstance(v, str) and v for v in desc.files.values())


@FAST
@given(st.binary(max_size=64) | raw_descriptions.map(lambda d: json.dumps(d).encode()), st.integers(0, 64))
def test_any_file_gives_a_description_or_our_error(tmp_path_factory, raw, cut):
    path = tmp_path_factory.mktemp("desc") / "quant_model_description.json"
    path.write_bytes(raw[: len(raw) - cut] if cut < len(raw) else raw)
    with contextlib.suppress(DescriptionError):
        QuantDescription.from_json(path)


# --- scheme round trips ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearRoundTrip:
    """A scheme's round trip and its bound, from its own test (``source``). ``k_step``: K is a multiple of it."""

    quant_type: str
    bound: float
    source: str
    group: int = 0
    k_step: int = 16
    even_n: bool = False
    calib: str = ""  # "range": static ranges from x; "fixed": W8A8S's ±4σ range with x clamped; "flatquant"
    options: tuple = ()


LINEAR = [
    LinearRoundTrip("W8A16", 2e-2, "test_w8a16.py"),
    LinearRoundTrip("W8A8_DYNAMIC", 3e-2, "test_w8a8_dynamic.py"),
    LinearRoundTrip("W8A8", 3e-2, "test_w8a8.py", calib="range"),
    LinearRoundTrip("W8A8_MIX", 3e-2, "test_w8a8_mix.py", calib="range", options=(("mode", "static"),)),
    LinearRoundTrip("W8A8_MIX", 3e-2, "test_w8a8_mix.py", calib="range", options=(("mode", "dynamic"),)),
    LinearRoundTrip("W8A8S", 3e-2, "test_w8a8s.py", calib="fixed"),
    LinearRoundTrip("W4A16", 0.18, "test_w4a16.py", even_n=True),
    LinearRoundTrip("W4A16", 0.13, "test_w4a16.py", group=64, k_step=64, even_n=True),
    LinearRoundTrip("W4A8_DYNAMIC", 0.16, "test_w4a8_dynamic.py", even_n=True),
    LinearRoundTrip("W4A8_DYNAMIC", 0.14, "test_w4a8_dynamic.py", group=64, k_step=64, even_n=True),
    LinearRoundTrip("W4A4_DYNAMIC", 0.25, "test_w4a4_dynamic.py"),
    LinearRoundTrip("WFP8AFP8_DYNAMIC", 6e-2, "test_fp8_dynamic.py"),
    LinearRoundTrip("W8A8FP8_DYNAMIC", 6e-2, "test_fp8_dynamic.py"),
    LinearRoundTrip("W8A8_MXFP8", 6e-2, "test_mxfp8.py"),
    LinearRoundTrip("W4A4_MXFP4", 0.25, "test_mxfp4.py"),
    LinearRoundTrip("W8A8_FLATQUANT_DYNAMIC", 3e-2, "test_flatquant.py", calib="flatquant"),
    LinearRoundTrip("W4A8_FLATQUANT_DYNAMIC", 0.2, "test_flatquant.py", even_n=True, calib="flatquant"),
    LinearRoundTrip("W4A4_FLATQUANT_DYNAMIC", 0.28, "test_flatquant.py", calib="flatquant"),
]
TOKENS = 16


def test_every_scheme_has_a_round_trip():
    assert {c.quant_type for c in LINEAR} == {q for q, _ in quant_core.supported_schemes("linear")}
    assert {c.quant_type for c in MOE} == {q for q, _ in quant_core.supported_schemes("moe")}


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


# Shapes span the per-scheme tests' range (K 64..576, N 32..128; their bounds are derived for Gaussian rows of K up to
# 576). Scales: every row of the weight gets its own factor 2^[-2, 2] on top of a global 10^[-2, 2], the activations a
# global 10^[-2, 2]: relative errors of these grids do not depend on scale, so the bounds must hold unchanged.
@pytest.mark.parametrize(
    "case", LINEAR, ids=[f"{c.quant_type}-g{c.group}-{dict(c.options).get('mode', '')}" for c in LINEAR]
)
@ROUND_TRIP
@given(
    k_steps=st.integers(1, 36),
    n=st.integers(32, 128),
    w_exp=st.floats(-2, 2),
    x_exp=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(("reference", "cpu")),
)
def test_linear_round_trip(case, k_steps, n, w_exp, x_exp, seed, backend):
    k = max(64, min(576, case.k_step * k_steps) // case.k_step * case.k_step)
    n = n + (n % 2) if case.even_n else n
    g = torch.Generator().manual_seed(seed)
    rows = 2.0 ** (torch.rand(n, 1, generator=g) * 4 - 2)
    weight = torch.randn(n, k, generator=g) / k**0.5 * rows * 10.0**w_exp
    x = torch.randn(TOKENS, k, generator=g) * 10.0**x_exp
    bias, calibration = None, {}
    if case.calib == "range":
        bias = torch.randn(n, generator=g) * 0.5 * float(weight.norm(dim=1).mean()) * 10.0**x_exp
        calibration = {"act_min": x.min().item(), "act_max": x.max().item()}
    elif case.calib == "fixed":
        bias = torch.randn(n, generator=g) * 0.1 * float(weight.norm(dim=1).mean()) * 10.0**x_exp
        r = 4.0 * 10.0**x_exp
        calibration, x = {"act_min": -r, "act_max": r}, x.clamp(-r, r)
    elif case.calib == "flatquant":
        left, right = get_decompose_dim(k)
        calibration = {"left_trans": _orthogonal(left, g), "right_trans": _orthogonal(right, g),
                       "clip_ratio": torch.tensor([1.0])}  # fmt: skip
    scheme = quant_core.get_scheme(case.quant_type, "linear", backend=backend, group_size=case.group,
                                   **dict(case.options))  # fmt: skip
    tensors = scheme.quantize_weights(weight, bias, **calibration)
    quant_core.check_tensors(scheme.weight_specs(k, n, torch.bfloat16), tensors, "layer")
    y = scheme.apply(scheme.process_weights(tensors, layer="layer"), x, bias)
    ref = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    err = rel_err(y, ref)
    assert err < case.bound, f"{case.quant_type} ({case.source} bound {case.bound}): K={k} N={n} err {err:.3g}"


@dataclass(frozen=True)
class MoERoundTrip:
    quant_type: str
    bound: float
    group: int = 0


# test_moe.py: against the float MoE, W8A16 2e-2, W4A16 g32 0.2, W4A8_DYNAMIC 0.25, W8A8_DYNAMIC 4e-2.
MOE = [MoERoundTrip("W8A16", 2e-2), MoERoundTrip("W4A16", 0.2, 32), MoERoundTrip("W4A8_DYNAMIC", 0.25),
       MoERoundTrip("W8A8_DYNAMIC", 4e-2)]  # fmt: skip


def moe_reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """float64 MoE (format §8.4, no quantization): Σ_j p_j · (silu(x W1ᵀ) ⊙ (x W3ᵀ)) W2ᵀ over the routed experts."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            out[t] += float(weights[t, j]) * (w2[e].double() @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("case", MOE, ids=[c.quant_type for c in MOE])
@ROUND_TRIP
@given(
    e=st.integers(2, 6),
    h=st.sampled_from((64, 128)),
    i=st.sampled_from((32, 64)),
    w_exp=st.floats(-1, 1),
    x_exp=st.floats(-1, 1),
    seed=st.integers(0, 2**16),
)
def test_moe_round_trip(case, e, h, i, w_exp, x_exp, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5 * 10.0**w_exp
    w2 = torch.randn(e, h, i, generator=g) / i**0.5 * 10.0**w_exp
    x = torch.randn(TOKENS, h, generator=g) * 10.0**x_exp
    weights, ids = torch.topk(torch.rand(TOKENS, e, generator=g), 2, dim=-1)
    weights = torch.softmax(weights, dim=-1)
    moe = quant_core.get_scheme(case.quant_type, "moe", backend="reference", group_size=case.group)
    y = moe.apply(moe.process_weights(moe.quantize_weights(w13, w2), layer="moe"), x, weights, ids)
    err = rel_err(y, moe_reference(x, w13, w2, weights, ids))
    assert err < case.bound, f"{case.quant_type} (test_moe.py bound {case.bound}): E={e} H={h} I={i} err {err:.3g}"
