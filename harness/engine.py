"""One vLLM engine, measured; run as a subprocess by `harness.demo` (one process per model: clean memory, no engine
re-initialisation inside one interpreter). Writes one JSON file:

- `generations`: greedy completions of PROMPTS (chat template for the chat prompts);
- `ppl`: token-level perplexity of held-out Wikipedia docs (`harness/data/wiki_ppl.jsonl`, each truncated to
  `--ppl-max-len` tokens), from the engine's `prompt_logprobs`: exp(mean NLL of every token after the first);
- `speed`: one request at a time (batch 1), greedy, EOS ignored, tokens streamed as the engine steps, after one
  warm-up request. Prefill: `--prefill-len` prompt tokens / time to the first token (median of `--repeats`).
  Decode: 1 / median time between consecutive output tokens of a short prompt (`--repeats` × `--decode-tokens`);
- `memory`: bytes of the checkpoint's safetensors on disk and of the weights the engine holds (parameters and the
  quant methods' processed tensors, tied tensors counted once);
- `kernels`: which quant-core kernel serves how many layers.

    python -m harness.engine --model DIR [--quantization ascend] --out result.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
PROMPTS = (
    ("text", "The capital of France is"),
    ("chat", "What is the boiling point of water at sea level?"),
    ("chat", "Write a short story about a robot who learns to paint."),
)
REQUEST_IDS = itertools.count()
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def read_texts(path: Path, limit: int) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["text"] for line in lines[:limit]]


# --- run inside the engine's worker (collective_rpc) -----------------------------------------------------------------
def kernel_names(worker) -> dict[str, int]:
    """How many layers each quant-core kernel serves (vLLM's own methods by class name)."""
    counts: Counter[str] = Counter()
    for module in worker.model_runner.model.modules():
        runtime = getattr(module, "modelslim_runtime", None)
        if runtime is not None:
            kernel = getattr(runtime, "kernel", None)
            counts[f"{kernel.backend}:{kernel.name}" if kernel else type(runtime).__name__] += 1
        elif getattr(module, "quant_method", None) is not None:
            counts[type(module.quant_method).__name__] += 1
    return dict(counts)


def weight_bytes(worker) -> dict[str, int]:
    """Bytes of the weights the engine holds: parameters, plus the tensors quant methods keep after loading (tied
    tensors once). Opaque packed forms are sized as follows: fbgemm objects are unpacked and their int8 weight
    counted; a float linear whose weight vLLM's CPU path moved into a oneDNN/SGL handle (leaving an empty parameter)
    counts as out × in × dtype size (`computed_bytes`, included in `bytes`)."""
    import torch

    seen: set[tuple[int, int]] = set()
    total, computed, unmeasured = 0, 0, 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for module in worker.model_runner.model.modules():
        for param in module.parameters(recurse=False):
            add(param.data)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() == 0 and hasattr(module, "cpu_linear"):
            computed += module.output_size_per_partition * module.input_size_per_partition * weight.element_size()
        for value in (getattr(module, "modelslim_runtime", None) or {}).values():
            if isinstance(value, torch.Tensor):
                add(value)
            elif isinstance(value, torch.ScriptObject):
                try:
                    total += torch.ops.quantized.linear_unpack(value)[0].int_repr().nbytes  # a fresh copy: no dedup
                except RuntimeError:
                    unmeasured += 1
    return {"bytes": total + computed, "computed_bytes": computed, "unmeasured_objects": unmeasured}


# --- measurements ----------------------------------------------------------------------------------------------------
def generations(llm, max_tokens: int) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if kind == "chat"
        else p
        for kind, p in PROMPTS
    ]
    outs = llm.generate(texts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [
        {"kind": kind, "prompt": p, "text": out.outputs[0].text, "tokens": len(out.outputs[0].token_ids)}
        for (kind, p), out in zip(PROMPTS, outs, strict=True)
    ]


def perplexity(llm, docs: int, max_len: int) -> dict[str, Any]:
    import math

    from vllm import SamplingParams, TokensPrompt

    tokenizer = llm.get_tokenizer()
    prompts = [
        TokensPrompt(prompt_token_ids=tokenizer.encode(t)[:max_len]) for t in read_texts(DATA / "wiki_ppl.jsonl", docs)
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for prompt, out in zip(prompts, outs, strict=True):
        ids = prompt["prompt_token_ids"]
        for token, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True):
            nll -= entry[token].logprob
            count += 1
    return {"docs": len(prompts), "tokens": count, "max_len": max_len, "nll": nll / count, "ppl": math.exp(nll / count)}


def batch_token_times(llm, prompts: list[list[int]], max_tokens: int) -> list[list[float]]:
    """Seconds from submission to the arrival of each output token, per request, for `prompts` submitted together
    and alone in the engine (greedy, EOS ignored), stepping the engine ourselves and streaming the tokens as they
    come."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    ids = [f"speed-{next(REQUEST_IDS)}" for _ in prompts]
    times: dict[str, list[float]] = {i: [] for i in ids}
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            times[out.request_id] += [time.perf_counter() - start] * len(out.outputs[0].token_ids)
    if any(len(t) != max_tokens for t in times.values()):
        raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos, got {[len(t) for t in times.values()]}")
    return [times[i] for i in ids]


def token_times(llm, prompt: list[int], max_tokens: int) -> list[float]:
    """`batch_token_times` for one request alone in the engine."""
    return batch_token_times(llm, [prompt], max_tokens)[0]


def speed(llm, prefill_len: int, decode_tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill: `prefill_len` prompt tokens / time to the first token, median over `repeats`. Decode: 1 / the median
    time between consecutive output tokens of a short prompt, pooled over `repeats` (robust to the process being
    descheduled now and then on a shared machine; the mean rate is kept too). After one warm-up request."""
    tokenizer = llm.get_tokenizer()
    text = " ".join(read_texts(DATA / "calib_wiki.jsonl", 64))
    long_prompt = tokenizer.encode(text)[:prefill_len]
    short_prompt = tokenizer.encode("Once upon a time, in a small village by the sea,")
    token_times(llm, long_prompt[:64], 4)  # warm-up
    prefill = [len(long_prompt) / token_times(llm, long_prompt, 1)[0] for _ in range(repeats)]
    gaps, spans = [], []
    for _ in range(repeats):
        times = token_times(llm, short_prompt, 1 + decode_tokens)
        gaps += [b - a for a, b in itertools.pairwise(times)]
        spans.append(times[-1] - times[0])
    return {
        "prefill_tokens": len(long_prompt),
        "prefill_tps": statistics.median(prefill),
        "decode_tokens": decode_tokens,
        "decode_tps": 1 / statistics.median(gaps),
        "decode_tps_mean": decode_tokens * repeats / sum(spans),
        "repeats": repeats,
        "all_prefill_tps": prefill,
    }


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def make_llm(model: Path, dtype: str, quantization: str | None, max_model_len: int, max_num_seqs: int):
    """The in-process engine every harness measurement uses (eager, seed 0, no prefix caching), and the keyword
    arguments that chose its quantization."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import vllm

    from vllm_adapter.plugin import register

    register()  # in-process engines load entry points late; registering here is idempotent
    kwargs: dict[str, Any] = {"quantization": our_method(quantization)} if quantization else {}
    llm = vllm.LLM(model=str(model), dtype=dtype, enforce_eager=True, seed=0, enable_prefix_caching=False,
                   max_model_len=max_model_len, max_num_seqs=max_num_seqs, **kwargs)  # fmt: skip
    return llm, kwargs


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["MODELSLIM_BACKEND"] = args.backend  # the adapter's kernel backend (vllm_adapter.config.BACKEND_ENV)
    start = time.perf_counter()
    import torch
    import vllm

    llm, kwargs = make_llm(args.model, args.dtype, args.quantization,
                           max(args.ppl_max_len + 1, args.prefill_len + 1, 1024), max_num_seqs=4)  # fmt: skip
    loaded = time.perf_counter()
    result: dict[str, Any] = {
        "label": args.label,
        "model": str(args.model),
        "quantization": kwargs.get("quantization", "none"),
        "device": args.device,
        "backend_requested": args.backend,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "vllm": vllm.__version__,
        "vllm_distribution": next((f"{d}=={metadata.version(d)}" for d in ("vllm-cpu", "vllm") if has_dist(d)), "?"),
        "startup_s": loaded - start,
        "kernels": llm.collective_rpc(kernel_names)[0],
    }
    result["memory"] = {"checkpoint_bytes": checkpoint_bytes(Path(args.model)), **llm.collective_rpc(weight_bytes)[0]}
    result["generations"] = generations(llm, args.max_tokens)
    result["ppl"] = perplexity(llm, args.ppl_docs, args.ppl_max_len)
    result["speed"] = speed(llm, args.prefill_len, args.decode_tokens, args.repeats)
    result["wall_s"] = time.perf_counter() - start
    del llm
    gc.collect()
    return result


def our_method(name: str) -> str:
    """`ascend` when vllm-adapter serves that name; `modelslim` where another package (vllm-ascend) owns `ascend`."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    from vllm_adapter.config import AscendModelSlimConfig

    return name if name != "ascend" or get_quantization_config("ascend") is AscendModelSlimConfig else "modelslim"


def has_dist(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="model")
    parser.add_argument("--quantization", default=None, help="e.g. ascend; omitted for the float model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="adapter kernels (MODELSLIM_BACKEND)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--ppl-docs", type=int, default=8)
    parser.add_argument("--ppl-max-len", type=int, default=1024)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
