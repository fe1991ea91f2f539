"""`vllm serve` of a quantized tiny model under a bounded burst of concurrent completion requests on loopback.

Checks (issue: reliability under load): no request fails or misses its deadline; every answer equals the answer to
the same request sent alone (greedy; the int8 kernels accumulate exactly in int32 and rescale per token, so a
token's result does not depend on its batch neighbours); the server's resident memory (API server + engine-core
process) does not grow across the burst, measured after a warm-up burst of the same shape so that allocator pools,
the KV cache and compiled kernels already exist. The numbers are written to `build/reliability/serve_load.json`
(and printed); copy it to docs/reliability-serve-load.json and regenerate docs/reliability.md
(`python harness/reliability_table.py`) to publish the numbers.
"""

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from test_serve import serve, stop, wait_healthy

CLIENTS, REQUESTS_PER_CLIENT = 32, 20
DEADLINE_S = 120  # per request; the burst queues 640 requests behind 8 engine slots on two shared cores
MAX_TOKENS = 8
PROMPTS = [f"Request {i}: the quantized model continues the story of number {i * 7 % 13} and" for i in range(16)]
# Growth allowed between the warm-up burst and the measured burst: RSS is sampled once per burst, and glibc may
# keep a few MiB of freed arenas around; a leak of even 10 KiB per request would exceed it (640 requests: 6.4 MiB).
RSS_GROWTH_MAX_MIB = 32
OUT = Path(__file__).resolve().parents[3] / "build" / "reliability" / "serve_load.json"


def post(url: str, model: str, prompt: str) -> tuple[str, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        text = json.loads(response.read())["choices"][0]["text"]
    return text, time.perf_counter() - start


def rss_mib(pid: int) -> float:
    server = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [server, *server.children(recursive=True)]) / 2**20


def burst(url: str, model: str) -> tuple[list[tuple[int, str, float]], list[str]]:
    """CLIENTS threads, each sending REQUESTS_PER_CLIENT requests one after another; (prompt index, text, latency)."""

    def client(c: int) -> tuple[list, list]:
        done, failed = [], []
        for r in range(REQUESTS_PER_CLIENT):
            index = (c * REQUESTS_PER_CLIENT + r) % len(PROMPTS)
            try:
                text, latency = post(url, model, PROMPTS[index])
                done.append((index, text, latency))
            except Exception as error:  # every failure is counted and reported
                failed.append(f"client {c} request {r}: {type(error).__name__}: {error}")
        return done, failed

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, range(CLIENTS)))
    return [d for done, _ in results for d in done], [f for _, failed in results for f in failed]


def test_serve_survives_a_burst_with_sequential_answers(checkpoints, tmp_path):
    model_dir = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")
    proc, url, log = serve(model_dir, tmp_path / "serve.log", max_num_seqs=8)
    model = str(model_dir)
    try:
        wait_healthy(proc, url, log)
        alone = [post(url, model, prompt)[0] for prompt in PROMPTS]
        burst(url, model)  # warm-up: same shape, not measured
        rss_before = rss_mib(proc.pid)
        start = time.perf_counter()
        done, failed = burst(url, model)
        seconds = time.perf_counter() - start
        rss_after = rss_mib(proc.pid)
    finally:
        code = stop(proc)
    latencies = sorted(latency for _, _, latency in done)
    mismatched = [(PROMPTS[i], text, alone[i]) for i, text, _ in done if text != alone[i]]
    numbers = {
        "model": "tiny qwen3, W8A8_DYNAMIC (quant-core quantize), fp32, --max-num-seqs 8",
        "clients": CLIENTS,
        "requests": CLIENTS * REQUESTS_PER_CLIENT,
        "max_tokens": MAX_TOKENS,
        "failed": len(failed),
        "differ_from_sequential": len(mismatched),
        "p50_latency_s": statistics.median(latencies) if latencies else None,
        "p99_latency_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "burst_seconds": seconds,
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(numbers, indent=1) + "\n")
    print(json.dumps(numbers, indent=1))
    assert not failed, f"{len(failed)} of {CLIENTS * REQUESTS_PER_CLIENT} requests failed, e.g. {failed[:3]}"
    assert not mismatched, f"{len(mismatched)} answers differ from the same request alone, e.g. {mismatched[:2]}"
    assert rss_after - rss_before <= RSS_GROWTH_MAX_MIB, f"server RSS grew {rss_before:.0f} -> {rss_after:.0f} MiB"
    assert code == 0, f"vllm serve exited with {code} after SIGINT:\n{log.read_text()[-2000:]}"
