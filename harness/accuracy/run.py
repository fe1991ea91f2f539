"""`nox -s accuracy`: lm-eval on the float model and every configured scheme in one run, gated on recovery.

    python -m harness.accuracy.run [--model smollm2-135m] [--schemes W8A16,W8A8_DYNAMIC] [--smoke]
                                   [--backend vllm|hf] [--device cpu] [--out build/accuracy]

1. Configurations: `harness/configs/<model>/<scheme>.yaml` (`tasks`, `limits`, `gates`); FLOAT always runs. A task's
   limit (its first N documents) must be the same in every configuration that lists it: ratios compare the same items.
2. Checkpoints from `harness.prepare` (the float model, then each scheme quantized once into the cache).
3. lm-eval per model, each in its own process (`harness.accuracy.evaluate`).
4. Kernel vs exact token perplexity per scheme (`harness.accuracy.exact`).
5. Gates (`harness.accuracy.gates`), then `report.md`, `results.json` and `recovery.png` under `--out`.
Exits non-zero when a gate fails. `--smoke` (CI): float + two schemes, small limits, each configuration's
`smoke_gates` (its regression guard) where it has them, else its gates; the report says which applied.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.accuracy import exact, report
from harness.accuracy.evaluate import TOKEN_PPL
from harness.accuracy.gates import Gate, accuracy_gate, ppl_floor_gate, ppl_gate
from harness.configs import ROOT, RunConfig, load, schemes

DATA = ROOT / "harness" / "data"
TASK_DATA = {
    "wiki_ppl_local": "wiki_ppl.jsonl",
    "owt_ppl_local": "owt_ppl.jsonl",
    "siqa_local": "siqa.jsonl",
    "wiki_order_local": "wiki_order.jsonl",
}
# Gated: token perplexity (exp of the mean NLL per token, as the targets and the kernel-vs-exact loop measure it).
# lm-eval's word perplexity is the same NLL per whitespace word (~1.6 tokens here), so its ratio is the token ratio
# raised to ~1.6; the report shows both.
PPL_METRIC, ACC_METRIC = TOKEN_PPL, "acc,none"
GATES = ("ppl_ratio_max", "ppl_ratio_min", "acc_ratio_min")
SMOKE_SCHEMES = ("W8A16", "W8A8_DYNAMIC")
# Smoke budget (~100-350 tokens/s here): 2 Wikipedia docs (~2.8k tokens) + 30 SocialIQA items (~3k) per model.
SMOKE_LIMITS = {"wiki_ppl_local": 2, "siqa_local": 30}
EXACT_TOKENS = {False: 2048, True: 512}  # kernel-vs-exact tokens (full, smoke): two model loads + passes per scheme
MAX_LENGTH = 2048  # one window per perplexity document (~1.4k tokens each)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class ModelRun:
    config: RunConfig
    samples: dict[str, list[int]]
    checkpoint: Path | None = None
    quantize_seconds: float = 0.0
    lm_eval: dict[str, Any] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nox -s accuracy --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", help="comma-separated (default: every configured scheme; --smoke: two)")
    parser.add_argument("--smoke", action="store_true", help="float + two schemes, small limits (CI)")
    parser.add_argument("--backend", choices=("vllm", "hf"), help="default: vllm when importable, else hf")
    parser.add_argument("--device", default="cpu", help="device of the hf backend (vLLM picks its own platform)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "accuracy")
    parser.add_argument("--resume", action="store_true", help="reuse lm-eval results in --out whose spec is unchanged")
    args = parser.parse_args(argv)
    args.backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    return args


def select(model: str, wanted: str | None, smoke: bool) -> list[RunConfig]:
    """FLOAT first, then the wanted schemes (each must have a configuration)."""
    if wanted:
        names = [s.strip().upper() for s in wanted.split(",") if s.strip()]
    else:
        names = list(SMOKE_SCHEMES) if smoke else schemes(model)
    return [load(model, s) for s in ["FLOAT", *(n for n in names if n != "FLOAT")]]


def task_limits(configs: list[RunConfig], smoke: bool) -> dict[str, int]:
    """One limit per task across all configurations (an error if two disagree), clipped to the data's size."""
    limits: dict[str, int] = {}
    for config in configs:
        unknown = (set(config.gates) | set(config.smoke_gates or {})) - set(GATES)
        if unknown:
            raise SystemExit(f"{config.path}: unknown gates {sorted(unknown)}; known: {', '.join(GATES)}")
        stray = set(config.gated_tasks or ()) - set(config.tasks)
        if stray:
            raise SystemExit(f"{config.path}: gated_tasks {sorted(stray)} are not among its tasks {list(config.tasks)}")
        for task in config.tasks:
            if task not in TASK_DATA:
                raise SystemExit(f"{config.path}: unknown task {task!r}; known: {', '.join(TASK_DATA)}")
            size = sum(1 for line in (DATA / TASK_DATA[task]).open(encoding="utf-8") if line.strip())
            limit = min(int(config.limits.get(task, size)), size)
            if limits.setdefault(task, limit) != limit:
                raise SystemExit(
                    f"{config.path}: limit {limit} for {task} differs from another configuration's "
                    f"{limits[task]}; the float baseline and every scheme must score the same items"
                )
    if smoke:
        limits = {t: min(n, SMOKE_LIMITS[t]) for t, n in limits.items() if t in SMOKE_LIMITS}
    return limits


def plan(configs: list[RunConfig], smoke: bool) -> list[ModelRun]:
    """The float model scores every task any scheme needs; each scheme its own tasks."""
    limits = task_limits(configs, smoke)
    runs = []
    for config in configs:
        tasks = limits if config.scheme == "FLOAT" else [t for t in config.tasks if t in limits]
        runs.append(ModelRun(config, {t: list(range(limits[t])) for t in tasks}))
    return runs


def prepare(runs: list[ModelRun]) -> Path:
    from harness.prepare import default_model, quantized

    model_dir = default_model(runs[0].config.model)
    for run in runs:
        start = time.perf_counter()
        run.checkpoint = quantized(run.config, model_dir)
        run.quantize_seconds = time.perf_counter() - start
    return model_dir


def evaluate(run: ModelRun, args: argparse.Namespace, work: Path) -> None:
    name = run.config.scheme.lower()
    spec = {
        "model_dir": str(run.checkpoint),
        "quantized": run.config.scheme != "FLOAT",
        "backend": args.backend,
        "device": args.device,
        "max_length": MAX_LENGTH,
        "samples": run.samples,
        "out": str(work / f"{name}.json"),
    }
    spec_path, log = work / f"{name}.spec.json", work / f"{name}.log"
    result = Path(spec["out"])
    if args.resume and result.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        run.lm_eval = json.loads(result.read_text())
        print(f"[accuracy] {run.config.scheme}: reusing {result} (--resume)", flush=True)
        return
    result.unlink(missing_ok=True)  # a result only ever sits next to the spec that produced it
    spec_path.write_text(json.dumps(spec, indent=1))
    print(f"[accuracy] lm-eval ({args.backend}) on {run.config.scheme}: {_sizes(run)} (log: {log})", flush=True)
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "harness.accuracy.evaluate", str(spec_path)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"lm-eval on {run.config.scheme} failed (exit {done.returncode}); {log} ends with:\n{tail}")
    run.lm_eval = json.loads(result.read_text())
    print(f"[accuracy] {run.config.scheme}: {run.lm_eval['seconds']:.0f} s", flush=True)


def _sizes(run: ModelRun) -> str:
    return ", ".join(f"{t} × {len(i)}" for t, i in run.samples.items())


def metric(run: ModelRun, task: str, key: str) -> float | None:
    value = run.lm_eval.get("results", {}).get(task, {}).get(key)
    return None if value is None else float(value)


def n_items(run: ModelRun, task: str) -> int:
    return int(run.lm_eval["n-samples"][task]["effective"])


def apply_gates(baseline: ModelRun, run: ModelRun, smoke: bool) -> None:
    gates = run.config.gates_for(smoke)
    for task in filter(run.config.gated, run.samples):
        ppl, ppl_float = metric(run, task, PPL_METRIC), metric(baseline, task, PPL_METRIC)
        acc, acc_float = metric(run, task, ACC_METRIC), metric(baseline, task, ACC_METRIC)
        if ppl is not None and ppl_float is not None and "ppl_ratio_max" in gates:
            run.gates.append(ppl_gate(task, ppl, ppl_float, float(gates["ppl_ratio_max"])))
        if ppl is not None and ppl_float is not None and "ppl_ratio_min" in gates:
            run.gates.append(ppl_floor_gate(task, ppl, ppl_float, float(gates["ppl_ratio_min"])))
        if acc is not None and acc_float is not None and "acc_ratio_min" in gates:
            run.gates.append(accuracy_gate(task, acc, acc_float, n_items(run, task), float(gates["acc_ratio_min"])))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    start = time.perf_counter()
    runs = plan(select(args.model, args.schemes, args.smoke), args.smoke)
    work = args.out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare(runs)
    for run in runs:
        evaluate(run, args, work)
    checkpoints = {r.config.scheme: r.checkpoint for r in runs[1:]}
    exact_results = exact.kernel_vs_exact(model_dir, checkpoints, EXACT_TOKENS[args.smoke]) if checkpoints else {}
    for run in runs[1:]:
        apply_gates(runs[0], run, args.smoke)
    failed = [f"{r.config.scheme} {g.task} ({g.rule})" for r in runs for g in r.gates if not g.passed]
    report.write(args, runs, exact_results, time.perf_counter() - start)
    print(f"[accuracy] report: {args.out / 'report.md'}")
    if failed:
        print("[accuracy] FAILED gates:\n  " + "\n  ".join(failed), flush=True)
        return 1
    print("[accuracy] every gate passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
