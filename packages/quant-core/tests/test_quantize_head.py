"""A quantized ``lm_head`` on request (``layer_schemes=["lm_head=SCHEME"]``), also from a tied embedding table
(written as its own tensors, config untied), and final-norm -> head smoothing (``smooth_head``). References are
computed here from the written tensors and the float source model, not by the quantizer's code."""

import json
from pathlib import Path

import pytest
import torch
from calib_texts import write_calib

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from tie_reference import excess_err, fake_quant_with_ties, linear_with_slack  # noqa: E402

from quant_core import QuantDescription, get_scheme  # noqa: E402
from quant_core.cli import main  # noqa: E402
from quant_core.errors import QuantCoreError, UnsupportedSchemeError  # noqa: E402
from quant_core.quantize import quantize_model  # noqa: E402
from quant_core.runtime import QuantLinear, load_quantized  # noqa: E402
from quant_core.tiny_models import make_tiny_model  # noqa: E402

SEQ_LEN = 32
EMBED, HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
HEAD_ONLY = {"skip": ["model.layers.*"], "layer_schemes": ["lm_head=W8A8_DYNAMIC"], "progress": False}
OUTLIER_CHANNELS = [3, 17, 50, 99]
IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_calib(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> dict[str, Path]:
    """Tied tiny models (bf16, no ``lm_head.weight`` stored), and a llama whose final norm has 20x channels."""
    root = tmp_path_factory.mktemp("tied")
    models = {kind: make_tiny_model(kind, root / kind, tie_word_embeddings=True) for kind in ("llama", "qwen2")}
    outlier = make_tiny_model("llama", root / "outlier", tie_word_embeddings=True, seed=1)
    tensors = load_file(outlier / "model.safetensors")
    tensors[NORM][OUTLIER_CHANNELS] *= 20  # uncompensated: the head's input has outlier channels, as in real LLMs
    save_file(tensors, outlier / "model.safetensors", metadata={"format": "pt"})
    return {**models, "outlier": outlier}


def written(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in out.glob("*.safetensors") for k, v in load_file(shard).items()}


def source_tensors(model: Path) -> dict[str, torch.Tensor]:
    return load_file(model / "model.safetensors")


def config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def float_model(model: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def head_run(out: Path, ids: torch.Tensor = IDS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lm_head input, logits)`` of the transformers runtime on ``out`` (reference kernels, fp32)."""
    model = load_quantized(out, backend="reference", dtype=torch.float32)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(ids).logits
    return seen[0], logits


def dequantized_head(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """W8A8_DYNAMIC head as the format defines it: int8 weight · per-row scale (offset must be zero)."""
    assert not t["lm_head.weight_offset"].any()
    return t[HEAD].double() * t["lm_head.weight_scale"].double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_tied_head_quantized_on_request(tied, tmp_path):
    source = tied["llama"]
    summary = quantize_model(source, tmp_path / "q", "W8A8_DYNAMIC", **HEAD_ONLY)
    out = summary.out_dir
    entries = QuantDescription.from_checkpoint(out).entries
    assert {k: v for k, v in entries.items() if k.startswith(("lm_head", "model.embed"))} == {
        EMBED: "FLOAT", HEAD: "W8A8_DYNAMIC", "lm_head.weight_scale": "W8A8_DYNAMIC",
        "lm_head.weight_offset": "W8A8_DYNAMIC",
    }  # fmt: skip
    assert any("lm_head is quantized (W8A8_DYNAMIC) from the tied table" in note for note in summary.notes)
    assert config(source)["tie_word_embeddings"] is True and config(out)["tie_word_embeddings"] is False
    t, table = written(out), source_tensors(source)[EMBED]
    assert t[EMBED].dtype == table.dtype and torch.equal(t[EMBED], table)  # the lookup table is untouched
    # the head is round-to-nearest int8 of the table, per row: s = amax / 127 (independent recomputation)
    scale = table.float().abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(t["lm_head.weight_scale"], scale, rtol=1e-6, atol=0)
    assert (t[HEAD].int() - torch.round(table.float() / scale).int()).abs().max() <= 1  # ±1 only at fp32 ties

    x, got = head_run(out)
    reference = float_model(source)
    with torch.no_grad():
        hidden = reference.model(IDS).last_hidden_state
        float_logits = reference(IDS).logits
    # the decoder is float in both (same modules, same bf16 weights in fp32): the head sees the float hidden state
    torch.testing.assert_close(x, hidden, rtol=1e-5, atol=1e-5)
    xq, ties = fake_quant_with_ties(x, 127)  # per-token s = amax / 127, round half to even, in float64
    expected, slack = linear_with_slack(xq, ties, dequantized_head(t).float())
    # Beyond one-step flips at near-tie elements (slack), only float32 accumulation over K=128 differs (~1e-7); a
    # wrong scale, table or activation step moves logits by > 1e-3 relative.
    assert excess_err(got, expected, slack) < 1e-5
    assert rel_err(got, float_logits) > 1e-3  # the quantized head is what ran
    assert isinstance(load_quantized(out, backend="reference").lm_head, QuantLinear)


def test_broad_pattern_leaves_the_head_float_and_tied(tied, tmp_path):
    out = quantize_model(tied["llama"], tmp_path / "star", layer_schemes=["*=W8A8_DYNAMIC"], progress=False).out_dir
    entries = QuantDescription.from_checkpoint(out).entries
    assert HEAD not in entries and entries[EMBED] == "FLOAT"  # tied: one float table, no head tensors
    assert config(out)["tie_word_embeddings"] is True and HEAD not in written(out)
    # a later --skip naming the head wins over the rule that quantized it
    out = quantize_model(tied["llama"], tmp_path / "skipped", "W8A8_DYNAMIC", layer_schemes=["lm_head=W8A8_DYNAMIC"],
                         skip=["lm_head"], progress=False).out_dir  # fmt: skip
    assert config(out)["tie_word_embeddings"] is True and HEAD not in written(out)


def test_stored_head_is_quantized_in_place(tmp_path):
    source = make_tiny_model("qwen2", tmp_path / "untied")  # stores its own lm_head.weight
    summary = quantize_model(source, tmp_path / "q", "W8A8_DYNAMIC", **HEAD_ONLY)
    t, src = written(summary.out_dir), source_tensors(source)
    assert torch.equal(t[EMBED], src[EMBED]) and t[HEAD].dtype == torch.int8
    assert not any("tied" in note for note in summary.notes)
    scale = src[HEAD].float().abs().amax(1, keepdim=True) / 127  # from the stored head, not the table
    torch.testing.assert_close(t["lm_head.weight_scale"], scale, rtol=1e-6, atol=0)
    assert config(summary.out_dir)["tie_word_embeddings"] is False


def test_smooth_head_keeps_the_float_function(tied, calib, tmp_path):
    source = tied["qwen2"]
    out = quantize_model(source, tmp_path / "s", "W8A8_DYNAMIC", smooth_head=0.3, calib=calib, calib_seq_len=SEQ_LEN,
                         **HEAD_ONLY).out_dir  # fmt: skip
    t, src = written(out), source_tensors(source)
    assert torch.equal(t[EMBED], src[EMBED])  # the table the head came from is not scaled
    assert t[NORM].dtype == src[NORM].dtype and not torch.equal(t[NORM], src[NORM])
    assert all(torch.equal(t[k], v) for k, v in src.items() if k.startswith("model.layers.0.input_layernorm"))
    # norm / s and head columns · s: the factor the head's columns must carry is old norm / new norm (exact in the
    # bf16 checkpoint), so the written int8 head is the table times that factor, within half an int8 step per row
    factor = src[NORM].float() / t[NORM].float()
    assert factor.max() > 1.3 * factor.min()  # per-channel smoothing, not a uniform scale (measured 3.6 .. 6.4)
    smoothed = src[EMBED].float() * factor
    step = t["lm_head.weight_scale"].double()
    excess = (dequantized_head(t) - smoothed.double()).abs() - step * (0.5 + 1e-4)  # 1e-4: fp32 rounding of w / s
    assert excess.max() <= 0, excess.max()
    # the runtime: its head input is the float hidden state / factor (the new norm), and the float product with the
    # smoothed float head is the original model's logits (norm / s · W · s cancel up to fp32 rounding, ~1e-7)
    x, got = head_run(out)
    reference = float_model(source)
    with torch.no_grad():
        hidden, float_logits = reference.model(IDS).last_hidden_state, reference(IDS).logits
    torch.testing.assert_close(x * factor, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ smoothed.T, float_logits, rtol=1e-4, atol=1e-4)
    xq, ties = fake_quant_with_ties(x, 127)
    expected, slack = linear_with_slack(xq, ties, dequantized_head(t).float())
    assert excess_err(got, expected, slack) < 1e-5  # as in test_tied_head_quantized_on_request


def test_smooth_head_lowers_the_error_of_outlier_channels(tied, calib, tmp_path):
    source = tied["outlier"]
    plain = quantize_model(source, tmp_path / "plain", "W8A8_DYNAMIC", **HEAD_ONLY).out_dir
    smooth = quantize_model(source, tmp_path / "smooth", "W8A8_DYNAMIC", smooth_head=0.5, calib=calib,
                            calib_seq_len=SEQ_LEN, **HEAD_ONLY).out_dir  # fmt: skip
    with torch.no_grad():
        float_logits = float_model(source)(IDS).logits
    plain_err, smooth_err = (rel_err(head_run(out)[1], float_logits) for out in (plain, smooth))
    # 20x channels set every token's int8 step, so the other 124 channels lose ~4 bits; smoothing moves most of it
    # into the per-row weight scales. A no-op smoothing would leave the ratio at 1. Measured (seeds 0-2): logits
    # error 1.9-2.1 % -> 0.68-0.79 % at alpha 0.5 (0.88 % at 0.3).
    assert smooth_err < 0.6 * plain_err, (smooth_err, plain_err)


def test_smooth_head_leaves_the_calibration_of_other_layers_alone(tied, calib, tmp_path):
    """Scaling the head's columns in the calibration session must not scale the tied table the decoder reads: the
    decoder's static ranges (calibrated after smoothing) are those of the unsmoothed run."""
    options = {"calib": calib, "calib_seq_len": SEQ_LEN, "layer_schemes": ["lm_head=W8A8_DYNAMIC"], "progress": False}
    plain = written(quantize_model(tied["llama"], tmp_path / "plain", "W8A8", **options).out_dir)
    smooth = written(quantize_model(tied["llama"], tmp_path / "smooth", "W8A8", smooth_head=0.3, **options).out_dir)
    scales = [k for k in plain if k.endswith(".input_scale")]
    assert len(scales) == 14 and all(torch.equal(plain[k], smooth[k]) for k in scales)
    assert not torch.equal(plain[HEAD], smooth[HEAD])


def test_head_errors(tied, calib, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QuantCoreError, match=r"smooth_head .*quantized lm_head.*--layer-scheme lm_head="):
        quantize_model(tied["llama"], out, "W8A8_DYNAMIC", smooth_head=0.3, calib=calib, progress=False)
    with pytest.raises(QuantCoreError, match="--smooth-head: that needs calibration text"):
        quantize_model(tied["llama"], out, "W8A8_DYNAMIC", smooth_head=0.3, **HEAD_ONLY)
    with pytest.raises(UnsupportedSchemeError, match=r"lm_head = W4A4_FLATQUANT_DYNAMIC.*lm_head=W8A8_DYNAMIC"):
        quantize_model(tied["llama"], out, "W8A8_DYNAMIC", layer_schemes=["lm_head=W4A4_FLATQUANT_DYNAMIC"],
                       calib=calib, progress=False)  # fmt: skip
    assert not out.exists()


def test_gptq_leaves_the_head_round_to_nearest(tied, calib, tmp_path):
    source, g = tied["llama"], 32
    options = {"group_size": g, "layer_schemes": ["lm_head=W4A16"], "progress": False}
    summary = quantize_model(source, tmp_path / "gptq", "W4A16", gptq=True, calib=calib, calib_seq_len=SEQ_LEN,
                             **options)  # fmt: skip
    assert summary.gptq_layers == 14  # 7 linears x 2 decoder layers, not the head
    rtn = written(quantize_model(source, tmp_path / "rtn", "W4A16", **options).out_dir)
    t = written(summary.out_dir)
    head = {k: v for k, v in t.items() if k.startswith("lm_head.")}
    assert set(head) == {"lm_head.weight", "lm_head.weight_scale", "lm_head.weight_offset"}
    assert all(torch.equal(v, rtn[k]) for k, v in head.items())
    scheme = get_scheme("W4A16", "linear", backend="reference", version="1.0.0", group_size=g)
    plain = scheme.quantize_weights(source_tensors(source)[EMBED].float())  # RTN of the table itself
    assert all(torch.equal(head[f"lm_head.{k}"], v) for k, v in plain.items())
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(t[name], rtn[name])  # GPTQ did run on the decoder layers


def test_tied_embedding_and_head_each_get_their_own_scheme(tied, tmp_path):
    source = tied["llama"]
    rules = ["*.embed_tokens=W8A16", "lm_head=W8A8_DYNAMIC"]
    summary = quantize_model(source, tmp_path / "q", "W8A8_DYNAMIC", skip=["model.layers.*"], layer_schemes=rules,
                             progress=False)  # fmt: skip
    entries = QuantDescription.from_checkpoint(summary.out_dir).entries
    assert entries[EMBED] == "W8A16" and entries[HEAD] == "W8A8_DYNAMIC"
    assert any("which keeps W8A16" in note for note in summary.notes)
    assert config(summary.out_dir)["tie_word_embeddings"] is False
    t, table = written(summary.out_dir), source_tensors(source)[EMBED].float()
    # each is quantized from the float table (the head not from the W8A16 one): int8 rows with s = amax / 127
    scale = table.abs().amax(1, keepdim=True) / 127
    for prefix in ("model.embed_tokens", "lm_head"):
        assert t[f"{prefix}.weight"].dtype == torch.int8
        torch.testing.assert_close(t[f"{prefix}.weight_scale"].float(), scale, rtol=1e-6, atol=0)
    model = load_quantized(summary.out_dir, backend="reference", dtype=torch.float32)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme.quant_type == "W8A8_DYNAMIC"
    assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"


def test_cli_quantized_smoothed_head(tied, calib, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(tied["llama"]), "--out", str(out), "--scheme", "W8A8_DYNAMIC",
                 "--layer-scheme", "lm_head=W8A8_DYNAMIC", "--smooth-head", "0.3", "--calib", str(calib),
                 "--calib-seq-len", str(SEQ_LEN), "--no-progress"])  # fmt: skip
    assert code == 0
    assert "lm_head is quantized (W8A8_DYNAMIC) from the tied table" in capsys.readouterr().out
    assert QuantDescription.from_checkpoint(out).entries[HEAD] == "W8A8_DYNAMIC"
    t, src = written(out), source_tensors(tied["llama"])
    assert config(out)["tie_word_embeddings"] is False and not torch.equal(t[NORM], src[NORM])
    assert torch.equal(t[EMBED], src[EMBED])
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--smooth-head ALPHA" in capsys.readouterr().out
