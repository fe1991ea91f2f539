"""Kernel vs exact: token perplexity of one quantized checkpoint run by quant-core's fast kernels and by its
`reference` kernels (exact integer math), on the same tokens, in a direct PyTorch loop.

vLLM runs the same kernels as `load_quantized(backend="auto")` (vllm-adapter applies quant-core's schemes with the
kernel chooser's automatic choice and has no backend switch), so the "kernel" column is what the lm-eval run served.
A kernel that saturates (e.g. int8 products summed in int16 without VNNI) shows up as kernel PPL above exact PPL.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class ExactResult:
    tokens: int
    ppl_float: float
    ppl_kernel: float
    ppl_exact: float
    seconds: float


def token_windows(tokenizer, tokens: int, window: int, source: Path = DATA / "wiki_ppl.jsonl") -> list[torch.Tensor]:
    """The first `tokens` tokens of the perplexity text (documents in order), as windows of at most `window`."""
    ids: list[int] = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if len(ids) >= tokens:
            break
        ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
    ids = ids[:tokens]
    return [torch.tensor([ids[i : i + window]]) for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


@torch.inference_mode()
def token_ppl(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every window (each window predicts its tokens 1..n from 0..n-1)."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def float_ppl(model_dir: Path, windows: list[torch.Tensor]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return token_ppl(model, windows)


def quantized_ppl(checkpoint: Path, windows: list[torch.Tensor], backend: str) -> float:
    from quant_core.runtime import load_quantized

    return token_ppl(load_quantized(checkpoint, backend=backend, dtype=torch.float32), windows)


def kernel_vs_exact(
    model_dir: Path, checkpoints: dict[str, Path], tokens: int, window: int = 512
) -> dict[str, ExactResult]:
    """For each scheme's checkpoint: float, fast-kernel and exact token perplexity on the same `tokens` tokens."""
    from transformers import AutoTokenizer

    windows = token_windows(AutoTokenizer.from_pretrained(model_dir), tokens, window)
    count = sum(w.shape[1] - 1 for w in windows)
    reference = float_ppl(model_dir, windows)
    results = {}
    for scheme, checkpoint in checkpoints.items():
        start = time.perf_counter()
        kernel = quantized_ppl(checkpoint, windows, "auto")
        exact = quantized_ppl(checkpoint, windows, "reference")
        results[scheme] = ExactResult(count, reference, kernel, exact, time.perf_counter() - start)
        print(f"[accuracy] {scheme}: token PPL float {reference:.3f}, kernel {kernel:.3f}, exact {exact:.3f}")
    return results


def as_dict(results: dict[str, ExactResult]) -> dict[str, dict]:
    return {k: asdict(v) for k, v in results.items()}
