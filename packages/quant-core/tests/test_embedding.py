"""Quantized embedding lookups against an independent float reference: the whole table dequantized from the
checkpoint tensors (written here from the format spec, not by the schemes), then ``F.embedding``. Then the quantizer
(an embedding is quantized only on an explicit request) and the transformers runtime (QuantEmbedding, a tied head)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quant_core import (
    EMBEDDING_SCHEMES,
    CheckpointTensorError,
    QuantCoreError,
    QuantDescription,
    UnsupportedSchemeError,
    embedding_lookup,
    get_scheme,
    prepare_embedding,
)

IDS_1D = lambda v: torch.tensor([0, v - 1, 1, 2, v // 2, 1, v - 2])  # noqa: E731  both nibbles, ends, repeats
IDS_2D = lambda v: torch.tensor([[v - 1, 0, 3, 3, 4], [5, v - 2, 2, 7, 0], [1, 1, v // 2, 6, v - 3]])  # noqa: E731


def pack(values: torch.Tensor) -> torch.Tensor:
    """ModelSlim int4 rows: byte [j, h] = row 2j in the low nibble, row 2j+1 in the high nibble."""
    v = values.to(torch.int16) & 0xF
    return (v[0::2] | (v[1::2] << 4)).to(torch.uint8).view(torch.int8)


def checkpoint(quant_type: str, v: int, h: int, g: int = 0, *, scale_dtype=torch.float32, offsets=True, seed=0):
    """``(checkpoint tensors, float32 reference table [v, h])``: random int values and scales, the table computed
    from the format's formula (module docstring of quant_core.embedding)."""
    gen = torch.Generator().manual_seed(seed)
    groups = h // g if g else 1
    scale = (torch.rand(v, groups, generator=gen) * 0.1 + 0.01).to(scale_dtype)
    per_value = lambda t: t.float().repeat_interleave(h // groups, dim=1)  # noqa: E731  [v, groups] -> [v, h]
    if quant_type in ("W8A16", "W8A8_DYNAMIC"):
        q = torch.randint(-128, 128, (v, h), generator=gen, dtype=torch.int8)
        zero = quant_type == "W8A8_DYNAMIC" or not offsets
        offset = torch.zeros(v, 1) if zero else torch.randint(-20, 20, (v, 1), generator=gen).float()
        tensors = {"weight": q, "weight_scale": scale, "weight_offset": offset.to(scale_dtype)}
        return tensors, (q.float() - per_value(offset.to(scale_dtype))) * per_value(scale)
    w4 = torch.randint(-8, 8, (v, h), generator=gen)
    if quant_type == "W4A16":
        offset = torch.randint(-8, 8, (v, groups), generator=gen).float().to(scale_dtype)
        tensors = {"weight": pack(w4), "weight_scale": scale, "weight_offset": offset}
        return tensors, (w4.float() - per_value(offset)) * per_value(scale)
    # W4A8_DYNAMIC: weight_scale per row; with g > 0 an integer second-step scale per group
    row_scale = scale[:, :1]
    table = w4.float() * row_scale.float()
    tensors = {"weight": pack(w4), "weight_scale": row_scale, "weight_offset": torch.zeros(v, 1)}
    if g:
        second = torch.randint(1, 5, (v, groups), generator=gen).float()
        table = w4.float() * per_value(second) * row_scale.float()
        tensors |= {"weight_scale_second": second, "weight_offset_second": torch.zeros(v, groups, dtype=torch.int64)}
    tensors["scale_bias"] = 8 * table.double().sum(1, keepdim=True).float()
    return tensors, table


# (quant type, vocab rows, hidden, group size). Odd vocab sizes where the format allows them (int8 rows); the int4
# formats pack two vocab rows per byte, so their V is even (odd V is refused, see below), with odd V/2.
CASES = [
    ("W8A16", 37, 33, 0),
    ("W8A16", 101, 64, 0),
    ("W8A8_DYNAMIC", 37, 33, 0),
    ("W8A8_DYNAMIC", 64, 48, 0),
    ("W4A16", 38, 96, 32),
    ("W4A16", 46, 40, 0),  # group_size 0: one group spanning H
    ("W4A8_DYNAMIC", 38, 48, 0),
    ("W4A8_DYNAMIC", 46, 64, 32),  # two-step per-group form
]


@pytest.mark.parametrize(("quant_type", "v", "h", "g"), CASES)
@pytest.mark.parametrize("ids_of", [IDS_1D, IDS_2D], ids=["1d", "2d"])
def test_lookup_matches_dequantized_table(quant_type, v, h, g, ids_of):
    tensors, table = checkpoint(quant_type, v, h, g)
    emb = prepare_embedding(quant_type, tensors, group_size=g, layer="model.embed_tokens")
    assert (emb.num_embeddings, emb.embedding_dim) == (v, h)
    ids = ids_of(v)
    got = embedding_lookup(emb, ids)
    assert got.shape == (*ids.shape, h) and got.dtype == torch.float32
    expected = F.embedding(ids, table)
    # Both sides compute (q - offset) · scale in float32 from the same operands: equal bit for bit. Only the two-step
    # W4A8 form folds scale · second into one float32 factor first (one extra rounding, ≤ 2^-23 relative): 1e-6.
    torch.testing.assert_close(got, expected, rtol=1e-6 if g and quant_type == "W4A8_DYNAMIC" else 0, atol=0)


@pytest.mark.parametrize("quant_type", EMBEDDING_SCHEMES)
def test_model_dtype_scales_and_output_dtype(quant_type):
    """v0 checkpoints store scales in the model dtype; the output is cast to the requested dtype at the end."""
    tensors, table = checkpoint(quant_type, 40, 64, 32 if quant_type == "W4A16" else 0, scale_dtype=torch.bfloat16)
    emb = prepare_embedding(quant_type, tensors, group_size=32 if quant_type == "W4A16" else 0)
    ids = torch.arange(40)
    got = embedding_lookup(emb, ids, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, table.to(torch.bfloat16))  # the same float32 rows, rounded once to bf16


def test_packed_rows_stay_packed_and_lookup_gathers():
    tensors, _ = checkpoint("W4A16", 38, 96, 32)
    emb = prepare_embedding("W4A16", tensors, group_size=32)
    assert emb.weight.shape == (19, 96) and emb.weight.dtype == torch.int8
    assert torch.equal(emb.weight, tensors["weight"])
    assert embedding_lookup(emb, torch.tensor([], dtype=torch.long)).shape == (0, 96)


def test_quantizer_output_round_trips():
    """What the schemes' quantize_weights write (the quantizer's path) looks up to within quantization error."""
    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    ids = torch.tensor([[0, 49, 7], [8, 1, 2]])
    # RTN error per value ≤ half a step: int8 amax/254, int4 range/30 (asymmetric W4A16) or amax/14 (W4A8)
    for quant_type, g, bound in (("W8A16", 0, 1 / 254), ("W8A8_DYNAMIC", 0, 1 / 254), ("W4A16", 32, 1 / 14),
                                 ("W4A8_DYNAMIC", 0, 1 / 14)):  # fmt: skip
        tensors = get_scheme(quant_type, "linear", group_size=g).quantize_weights(weight)
        got = embedding_lookup(prepare_embedding(quant_type, tensors, group_size=g), ids)
        expected = F.embedding(ids, weight)
        amax = weight.abs().amax(1)[ids][..., None]
        assert ((got - expected).abs() <= bound * amax * 1.001).all(), quant_type


def test_unsupported_scheme_names_layer_and_supported():
    tensors = get_scheme("W8A8", "linear").quantize_weights(torch.randn(8, 16), act_min=-1.0, act_max=1.0)
    with pytest.raises(UnsupportedSchemeError, match=r"(?s)model\.embed_tokens.*W8A8\b.*W8A16, W8A8_DYNAMIC, W4A16"):
        prepare_embedding("W8A8", tensors, layer="model.embed_tokens")


def test_bad_tensors_name_the_layer():
    tensors, _ = checkpoint("W8A8_DYNAMIC", 37, 33)
    with pytest.raises(CheckpointTensorError, match=r"emb\.weight_offset is non-zero"):
        prepare_embedding("W8A8_DYNAMIC", {**tensors, "weight_offset": torch.ones(37, 1)}, layer="emb")
    with pytest.raises(CheckpointTensorError, match=r"emb.*int8 2-D 'weight'.*got nothing"):
        prepare_embedding("W8A16", {"weight_scale": tensors["weight_scale"]}, layer="emb")
    with pytest.raises(CheckpointTensorError, match=r"emb\.weight_scale.*shape \(36, 1\)"):
        prepare_embedding("W8A16", {**tensors, "weight_scale": tensors["weight_scale"][:36]}, layer="emb")
    w4, _ = checkpoint("W4A16", 38, 96, 32)
    with pytest.raises(CheckpointTensorError, match=r"emb\.weight_scale.*shape \(37, 3\)"):  # odd V cannot be packed
        prepare_embedding("W4A16", {**w4, "weight_scale": w4["weight_scale"][:37]}, group_size=32, layer="emb")
    a8, _ = checkpoint("W4A8_DYNAMIC", 38, 48)
    with pytest.raises(CheckpointTensorError, match=r"emb\.scale_bias' does not match the weights"):
        prepare_embedding("W4A8_DYNAMIC", {**a8, "scale_bias": -a8["scale_bias"]}, layer="emb")
    with pytest.raises(TypeError, match="integers"):
        embedding_lookup(prepare_embedding("W8A16", tensors), torch.tensor([1.0]))


# --- quantizer and transformers runtime -----------------------------------------------------------------------------
EMBED = "model.embed_tokens"
ONLY_EMBED = {"skip": ["model.layers.*"]}  # every other linear FLOAT: the table is the only quantized tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Float qwen3 models: untied with an odd vocabulary (389, W8A16 rows need no pairing), tied with 384 rows."""
    from quant_core.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("embed-float")
    return {"untied": make_tiny_model("qwen3", root / "untied", vocab_size=389),
            "tied": make_tiny_model("qwen3", root / "tied", tie_word_embeddings=True)}  # fmt: skip


def quantize(source: Path, out: Path, rule: str, **options):
    from quant_core.quantize import quantize_model

    return quantize_model(source, out, "W8A16", layer_schemes=[rule], progress=False, **{**ONLY_EMBED, **options})


def dequantized_table(model_dir: Path, quant_type: str, group_size: int = 0) -> torch.Tensor:
    """The float32 ``[V, H]`` table from the written tensors, by the format's formula (independent of the lookup)."""
    from safetensors.torch import load_file

    t = {k.removeprefix(EMBED + "."): v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()
         if k.startswith(EMBED + ".")}  # fmt: skip
    q = t["weight"]
    if quant_type in ("W4A16", "W4A8_DYNAMIC"):  # row 2j: low nibble, 2j+1: high nibble, sign-extended
        nibbles = torch.stack((q.to(torch.int16) & 0xF, (q.to(torch.int16) >> 4) & 0xF), 1).reshape(-1, q.shape[1])
        q = torch.where(nibbles > 7, nibbles - 16, nibbles)
    h = q.shape[1]
    scale, offset = t["weight_scale"].float(), t.get("weight_offset", torch.zeros(1, 1)).float()
    reps = h // scale.shape[1]
    return (q.float() - offset.repeat_interleave(reps, 1)) * scale.repeat_interleave(reps, 1)


def float_model_with_table(source: Path, table: torch.Tensor):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.model.embed_tokens.weight.data.copy_(table)  # a tied head shares this parameter
    return model


def test_quantizer_quantizes_an_embedding_only_when_a_rule_names_it(tiny, tmp_path):
    from quant_core.quantize import quantize_model

    entries = lambda out: QuantDescription.from_checkpoint(out).entries  # noqa: E731
    out = quantize_model(tiny["untied"], tmp_path / "default", "W8A16", progress=False).out_dir
    assert entries(out)[f"{EMBED}.weight"] == "FLOAT"  # msModelSlim's default
    out = quantize_model(tiny["untied"], tmp_path / "star", layer_schemes=["*=W4A8_DYNAMIC"], progress=False).out_dir
    assert entries(out)[f"{EMBED}.weight"] == "FLOAT"  # a broad pattern does not name it
    out = quantize(tiny["untied"], tmp_path / "named", "*.embed_tokens=W8A8_DYNAMIC").out_dir
    assert {k: v for k, v in entries(out).items() if k.startswith(EMBED)} == dict.fromkeys(
        [f"{EMBED}.weight", f"{EMBED}.weight_scale", f"{EMBED}.weight_offset"], "W8A8_DYNAMIC"
    )
    assert entries(out)["lm_head.weight"] == "FLOAT"
    # a later rule naming it wins (here: --skip), and a bare name gets a hint
    out = quantize(tiny["untied"], tmp_path / "skipped", "*.embed_tokens=W8A16", skip=["*.embed_tokens"]).out_dir
    assert entries(out)[f"{EMBED}.weight"] == "FLOAT"
    with pytest.raises(QuantCoreError, match=r"matches no linear layer.*try \*\.embed_tokens"):
        quantize(tiny["untied"], tmp_path / "bare", "embed_tokens=W8A16")
    with pytest.raises(UnsupportedSchemeError, match=r"(?s)model\.embed_tokens.*W8A8\b.*W8A16, W8A8_DYNAMIC.*from "):
        quantize(tiny["untied"], tmp_path / "static", "*.embed_tokens=W8A8")
    with pytest.raises(CheckpointTensorError, match=r"model\.embed_tokens.*out_features must be even, got 389"):
        quantize(tiny["untied"], tmp_path / "odd", "*.embed_tokens=W4A16", group_size=32)


@pytest.mark.parametrize(("quant_type", "g"), [("W8A16", 0), ("W8A8_DYNAMIC", 0)])
def test_runtime_untied_embedding_matches_float_model_with_the_dequantized_table(tiny, tmp_path, quant_type, g):
    from quant_core.runtime import QuantEmbedding, load_quantized

    out = quantize(tiny["untied"], tmp_path / "q", f"*.embed_tokens={quant_type}", group_size=g or None).out_dir
    model = load_quantized(out, backend="reference", dtype=torch.float32)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, torch.nn.Linear)
    ids = torch.randint(0, 389, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = float_model_with_table(tiny["untied"], dequantized_table(out, quant_type, g))
    with torch.no_grad():
        got, expected = model(ids).logits, reference(ids).logits
    # Same float32 rows (the lookup is exact, tested above) through the same float layers: equal up to kernel-level
    # reduction order, far below the quantization effect checked last.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    import transformers

    with torch.no_grad():
        unquantized = transformers.AutoModelForCausalLM.from_pretrained(tiny["untied"], dtype=torch.float32)(ids)
    assert (got - unquantized.logits).abs().max() > 1e-3  # the quantized table is what ran


@pytest.mark.parametrize(("quant_type", "g"), [("W8A16", 0), ("W4A16", 32)])
def test_runtime_tied_head_runs_the_quantized_table(tiny, tmp_path, quant_type, g):
    from quant_core.runtime import QuantEmbedding, QuantLinear, load_quantized

    summary = quantize(tiny["tied"], tmp_path / "q", f"model.embed_tokens={quant_type}", group_size=g or None)
    assert summary.notes == (f"the head is tied to model.embed_tokens: it runs {quant_type} too",)
    assert not any(k.startswith("lm_head") for k in QuantDescription.from_checkpoint(summary.out_dir).entries)
    model = load_quantized(summary.out_dir, backend="reference", dtype=torch.float32)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.scheme.quant_type == quant_type
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = float_model_with_table(tiny["tied"], dequantized_table(summary.out_dir, quant_type, g))
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    with torch.no_grad():
        got, expected = model(ids).logits, reference(ids).logits
    # The reference kernel dequantizes the same table and multiplies in float32: only summation order differs
    # (~1e-7 · √K relative per logit); 1e-4 is far below a wrong head (logits off by O(1)).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_tied_checkpoint_that_also_stores_the_head_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "tied-with-head"
    shutil.copytree(tiny["tied"], source)
    tensors = load_file(source / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors[f"{EMBED}.weight"].clone()}, source / "model.safetensors")
    assert json.loads((source / "config.json").read_text())["tie_word_embeddings"] is True
    with pytest.raises(QuantCoreError, match=r"ties the word embeddings.*also stores lm_head\.weight"):
        quantize(source, tmp_path / "out", "*.embed_tokens=W8A16")
    quantize(source, tmp_path / "float-embed", "*.q_proj=W8A16")  # nothing quantized on the table: fine
