"""Kernel vs exact: token perplexity of one quantized checkpoint run by quant-core's fast kernels and by its
`reference` kernels (exact integer math), on the same tokens, in a direct PyTorch loop.

vLLM runs the same kernels as `load_quantized(backend="auto")` (vllm-adapter applies quant-core's schemes with the
kernel chooser's automatic choice and has no backend switch; vLLM's own CPU int8 ops are registered here too, as in
the engine), so the "kernel" column is what the lm-eval run served.
A kernel that saturates (e.g. int8 products summed in int16 without VNNI) shows up as kernel PPL above exact PPL.

End to end, two exact computations that differ only in float summation order already disagree: per-token
activation quantization turns a last-bit difference into a flipped int8 code, and flips cascade through the layers
(SmolLM2 W8A8_DYNAMIC, 2k tokens: exact PPL 30.70; with the embeddings scaled by 1 ± 1e-6 noise 30.62-30.89). So
besides the perplexities each scheme gets the direct check: every quantized linear's kernel output on the exact
model's own inputs (first window), against the exact output (`layer_error`, relative to the output's max), and the
perplexity noise floor (`ppl_exact_perturbed`: exact math with the embeddings scaled by 1 + 1e-6 noise).
"""

from __future__ import annotations

import contextlib
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
    ppl_exact_perturbed: float
    layer_error: float  # max over quantized linears of max|kernel - exact| / max|exact| on the same inputs
    worst_layer: str
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


def load(checkpoint: Path, backend: str):
    from quant_core.runtime import load_quantized

    with contextlib.suppress(ImportError):  # vLLM's CPU int8 ops, which quant-core's chooser takes once registered
        import vllm._custom_ops  # noqa: F401

    return load_quantized(checkpoint, backend=backend, dtype=torch.float32)


@torch.inference_mode()
def layer_errors(kernel_model, exact_model, ids: torch.Tensor) -> tuple[float, str]:
    """Largest relative error of a kernel linear against the exact linear on the exact model's inputs for `ids`."""
    from quant_core.runtime.linear import QuantLinear

    kernels = dict(kernel_model.named_modules())
    worst, hooks = (0.0, ""), []

    def check(name, module, args, out):
        nonlocal worst
        err = (kernels[name](args[0]) - out).abs().max().item() / max(out.abs().max().item(), 1e-30)
        worst = max(worst, (err, name))

    for name, module in exact_model.named_modules():
        if isinstance(module, QuantLinear):
            hooks.append(module.register_forward_hook(lambda m, a, o, name=name: check(name, m, a, o)))
    try:
        exact_model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return worst


@torch.inference_mode()
def perturbed_ppl(model, windows: list[torch.Tensor], rel: float = 1e-6, seed: int = 0) -> float:
    """Token perplexity with the input embeddings scaled by 1 + rel·N(0, 1), restored afterwards."""
    weight = model.get_input_embeddings().weight
    saved = weight.clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    weight.mul_(1 + rel * noise.to(weight.dtype))
    try:
        return token_ppl(model, windows)
    finally:
        weight.copy_(saved)


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
        kernel_model, exact_model = load(checkpoint, "auto"), load(checkpoint, "reference")
        kernel, exact = token_ppl(kernel_model, windows), token_ppl(exact_model, windows)
        perturbed = perturbed_ppl(exact_model, windows)
        error, layer = layer_errors(kernel_model, exact_model, windows[0])
        results[scheme] = ExactResult(count, reference, kernel, exact, perturbed, error, layer,
                                      time.perf_counter() - start)  # fmt: skip
        print(f"[accuracy] {scheme}: token PPL float {reference:.3f}, kernel {kernel:.3f}, exact {exact:.3f} "
              f"(perturbed {perturbed:.3f}); worst linear {layer}: {error:.1e}")  # fmt: skip
    return results


def as_dict(results: dict[str, ExactResult]) -> dict[str, dict]:
    return {k: asdict(v) for k, v in results.items()}
