"""up_proj -> down_proj smoothing (``smooth_down``): the float model is unchanged, and static int8 improves."""

from pathlib import Path

import pytest
import torch
from calib_texts import TEXTS, write_calib

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from quant_core.errors import QuantCoreError  # noqa: E402
from quant_core.quantize import build_plan, quantize_model  # noqa: E402
from quant_core.quantize.calibrate import CalibrationConfig, FloatModel  # noqa: E402
from quant_core.quantize.plan import parse_rules  # noqa: E402
from quant_core.quantize.smooth import down_smoothing_groups, smooth_model  # noqa: E402
from quant_core.quantize.source import SourceCheckpoint  # noqa: E402
from quant_core.runtime import load_quantized  # noqa: E402
from quant_core.tiny_models import make_tiny_model  # noqa: E402

SEQ_LEN = 32
OUTLIER_ROWS = [5, 40, 77]  # intermediate channels of up_proj made 30x larger: down_proj input outliers


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_calib(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    """Tiny Llama whose up_proj has a few 30x rows (uncompensated), as the "massive" down_proj inputs of real LLMs."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("m") / "llama", dtype=torch.float32)
    tensors = load_file(path / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"][OUTLIER_ROWS] *= 30
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_down_smoothing_keeps_the_float_model(outlier_model, calib):
    source = SourceCheckpoint(outlier_model)
    session = FloatModel(outlier_model, CalibrationConfig(calib, seq_len=SEQ_LEN), progress=False)
    ids = session.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        before = session.model(input_ids=ids).logits
    groups, skipped = down_smoothing_groups(source, build_plan(source, "W8A8"), "llama", 0.7)
    assert [g.norm for g in groups] == [f"model.layers.{i}.mlp.up_proj" for i in range(2)] and not skipped
    smoothing = smooth_model(session, groups, 0.5, {})
    with torch.no_grad():
        after = session.model(input_ids=ids).logits
    # up rows / s and down columns * s cancel in real arithmetic; fp32 rounding of the two products leaves ~1e-7
    err = ((after - before).norm() / before.norm()).item()
    assert err < 1e-5, err
    assert not smoothing.norms  # no norm is touched by this kind of group
    for g in groups:
        up, down = g.norm, g.linears[0]
        for name in (up, down):  # what the writer quantizes is exactly the smoothed session weight
            written = smoothing.weight(name, source.read(f"{name}.weight"))
            assert torch.allclose(written, session.module(name).weight, rtol=1e-6, atol=0), name
        s = smoothing.column_scales[down]
        # alpha 0.7 shrinks the 30x outlier channels far more than the typical channel
        others = [c for c in range(s.numel()) if c not in OUTLIER_ROWS]
        assert s[OUTLIER_ROWS].min() > 3 * s[others].median()


def logits_error(ckpt: Path, model: Path) -> float:
    ids = torch.tensor([list(range(3, 40))])
    ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(input_ids=ids).logits
    out = load_quantized(ckpt, backend="reference", dtype=torch.float32)(input_ids=ids).logits
    return ((out - ref).norm() / ref.norm()).item()


def test_down_smoothing_lowers_static_int8_error(outlier_model, calib, tmp_path):
    scheme = "W8A8"  # per-tensor static ranges: one outlier channel sets the step of every token
    options = {"calib": calib, "calib_seq_len": SEQ_LEN, "progress": False, "smooth": 0.5}
    quantize_model(outlier_model, tmp_path / "norms", scheme, **options)
    summary = quantize_model(outlier_model, tmp_path / "down", scheme, smooth_down=0.7, **options)
    assert "down_proj smoothing (alpha 0.7) folded into 2 up_proj" in str(summary)
    plain, down = logits_error(tmp_path / "norms", outlier_model), logits_error(tmp_path / "down", outlier_model)
    # The 30x channels set down_proj's int8 activation step; moving them into its weight columns must cut the
    # end-to-end logits error clearly (a no-op smoothing would leave the ratio at 1). Measured: 0.151 -> 0.069.
    assert down < 0.8 * plain, (down, plain)


def test_down_smoothing_skips_float_pairs_and_checks_alpha(outlier_model, calib, tmp_path):
    source = SourceCheckpoint(outlier_model)
    plan = build_plan(source, "W8A8_DYNAMIC", rules=parse_rules(skip=["model.layers.1.mlp.down_proj"]))
    groups, skipped = down_smoothing_groups(source, plan, "llama", 0.5)
    assert [g.linears for g in groups] == [("model.layers.0.mlp.down_proj",)]
    assert skipped == ["model.layers.1.mlp.down_proj (it or model.layers.1.mlp.up_proj stays FLOAT)"]
    with pytest.raises(QuantCoreError, match="gated MLPs"):
        down_smoothing_groups(source, plan, "gpt2", 0.5)
    with pytest.raises(QuantCoreError, match="--smooth-down: that needs calibration text"):
        quantize_model(outlier_model, tmp_path / "x", "W8A8_DYNAMIC", smooth_down=0.5, progress=False)
    with pytest.raises(QuantCoreError, match=r"alpha must be a number in \(0, 1\)"):
        quantize_model(outlier_model, tmp_path / "x", "W8A8_DYNAMIC", smooth_down=1.0, calib=calib, progress=False)
