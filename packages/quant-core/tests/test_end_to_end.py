"""quantize_model -> load_quantized -> logits, against the float model, on tiny generated checkpoints."""

import pytest
import torch

from quant_core.quantize import quantize_model
from quant_core.runtime import load_quantized
from quant_core.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")

CALIB_TEXT = "\n".join(
    f"Sample {i}: quantized language models keep most of their accuracy when the scales are chosen well."
    for i in range(8)
)
# Relative logit error bounds against the float model (float32, 2-layer tiny models with random weights). Random
# weights have no outliers for smoothing to fix and are close to worst case for RTN: the runtime tests measured
# int8 schemes at 1.6-5.4 % and int4 schemes at 23-39 % on these models; the bounds leave ~1.5x.
CASES = [
    ("qwen3", "W8A8_DYNAMIC", {}, 0.05),
    ("qwen3", "W8A16", {}, 0.05),
    ("qwen3", "W8A8", {"calib": True}, 0.10),
    ("qwen3", "W8A8_MIX", {"calib": True}, 0.05),
    ("qwen2", "W8A8", {"calib": True}, 0.10),
    ("llama", "W8A8_DYNAMIC", {}, 0.05),
    ("qwen3", "W4A16", {"group_size": 32}, 0.40),
    ("qwen3", "W4A8_DYNAMIC", {}, 0.45),
    # MoE: the random router of a tiny model has near-ties, so the slightest perturbation (even quantizing
    # attention only) flips an expert for a few tokens and moves their logits by ~40 %; measured 10-15 % overall
    # with a 2-5 % median token. The median token error bounds the quantization error itself (see below).
    ("qwen3_moe", "W8A8_DYNAMIC", {}, 0.25),
    ("qwen3_moe", "W4A8_DYNAMIC", {"layer_schemes": ["*.self_attn.*=W8A8_DYNAMIC"]}, 0.40),
]
# Median over tokens of the per-token relative error: robust to a few routing flips.
MEDIAN_BOUND = {"W8A8_DYNAMIC": 0.06, "W4A8_DYNAMIC": 0.25}


@pytest.fixture(scope="module")
def float_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {kind: make_tiny_model(kind, root / kind) for kind in ("qwen3", "qwen2", "llama", "qwen3_moe")}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize(("kind", "scheme", "options", "bound"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_quantize_then_load_matches_the_float_model(tmp_path, float_models, calib_file, kind, scheme, options, bound):
    options = dict(options)
    if options.pop("calib", False):
        options["calib"] = calib_file
    out = tmp_path / "quantized"
    quantize_model(float_models[kind], out, scheme, progress=False, **options)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(CALIB_TEXT[:120], return_tensors="pt").input_ids
    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(float_models[kind], dtype=torch.float32), ids)
    quantized = logits(load_quantized(out, dtype=torch.float32), ids)
    err = ((quantized - reference).norm() / reference.norm()).item()
    assert err < bound, f"{kind} {scheme}: relative logit error {err:.3f} ≥ {bound}"
    if kind == "qwen3_moe":
        per_token = (quantized - reference).norm(dim=-1) / reference.norm(dim=-1)
        assert per_token.median() < MEDIAN_BOUND[scheme], f"median token error {per_token.median():.3f}"
