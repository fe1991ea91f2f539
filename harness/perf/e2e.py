"""End-to-end throughput runs for the benchmarks: which models, their checkpoints, one engine subprocess each.

Models: the float checkpoint (`harness.prepare.default_model`), each requested scheme quantized as
`harness/configs/<model>/<scheme>.yaml` says (`harness.prepare.quantized`, shared with the demo and accuracy
sessions) and served with `quantization="ascend"`, and the compressed-tensors peer (`harness.perf.peer`), served by
vLLM's own compressed-tensors support. Each engine runs `harness.perf.speed` in its own process, with the demo's
environment and thread count (`harness.demo.cpu_threads`); logs and raw results land in the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import configs, prepare
from harness.demo import cpu_threads
from harness.engine import ENV_DEFAULTS
from harness.perf.report import FLOAT, PEER

DEFAULT_SCHEMES = ("W8A8_DYNAMIC", "W8A16", "W4A16")
BATCHES = (1, 8)


@dataclass(frozen=True)
class Sizes:
    prefill_len: int  # tokens per prefill prompt
    decode_tokens: int  # decode steps per request
    repeats: int


FULL = Sizes(prefill_len=512, decode_tokens=64, repeats=3)
SMALL = Sizes(prefill_len=128, decode_tokens=16, repeats=2)


def log(message: str) -> None:
    print(f"[perf] {message}", file=sys.stderr, flush=True)


def labels(model: str, schemes: str, peer: bool) -> list[str]:
    """FLOAT first (every ratio needs it), then the schemes (comma-separated names, or `all` configured), then the
    peer."""
    if schemes.strip().lower() == "all":
        chosen = [s for s in configs.schemes(model) if s != FLOAT]
    else:
        chosen = [s.strip().upper() for s in schemes.split(",") if s.strip() and s.strip().upper() != FLOAT]
    for scheme in chosen:
        configs.load(model, scheme)  # an unknown scheme fails at collection, naming the configured ones
    return [FLOAT, *chosen, *([PEER] if peer else [])]


def checkpoint(label: str, model: str, cache: Path | None = None) -> tuple[Path, str | None]:
    """(checkpoint directory, `quantization=` for vLLM) of `label`, built into the cache if needed."""
    model_dir = prepare.default_model(model, cache)
    if label == FLOAT:
        return model_dir, None
    if label == PEER:
        from harness.perf.peer import peer_checkpoint

        return peer_checkpoint(model_dir, model, cache), None  # vLLM detects compressed-tensors from config.json
    return prepare.quantized(configs.load(model, label), model_dir, cache), "ascend"


def run_engine(label: str, model_dir: Path, quantization: str | None, sizes: Sizes, out_dir: Path) -> dict[str, Any]:
    """One `harness.perf.speed` subprocess; its log goes to <out_dir>/e2e-<label>.log, its result to .json."""
    out, log_path = out_dir / f"e2e-{label.lower()}.json", out_dir / f"e2e-{label.lower()}.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "harness.perf.speed", "--model", str(model_dir), "--out", str(out)]
    command += ["--label", label, "--batches", *map(str, BATCHES)]
    command += ["--quantization", quantization] if quantization else []
    for name, value in asdict(sizes).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = {**ENV_DEFAULTS, **os.environ}
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(configs.ROOT), env.get("PYTHONPATH")) if p)
    log(f"{label}: vLLM engine on {model_dir} (log in {log_path})")
    start = time.perf_counter()
    with log_path.open("w") as sink:
        code = subprocess.run(command, cwd=configs.ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the {label} engine failed (exit {code}); log {log_path}:\n{tail}")
    log(f"{label}: done in {time.perf_counter() - start:.0f} s")
    return json.loads(out.read_text())


def meta(results: dict[str, dict[str, Any]], model: str, sizes: Sizes) -> dict[str, Any]:
    """What the summary states about the runs: versions, threads, sizes, the range of 1-minute load averages."""
    loads = [r["loadavg"][when][0] for r in results.values() for when in ("before", "after")]
    any_result = next(iter(results.values()), {})
    return {
        "model": model,
        "vllm": any_result.get("vllm_distribution", "?"),
        "threads": any_result.get("threads", "?"),
        "sizes": asdict(sizes),
        "batches": list(BATCHES),
        "loadavg": f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?",
        "checkpoints": {label: r["model"] for label, r in results.items()},
        "kernels": {label: r["kernels"] for label, r in results.items()},
    }


class EngineRuns:
    """Each label's engine result, measured on first request and kept for the session (a failure too: the other
    runs of a failed model fail at once instead of starting the engine again)."""

    def __init__(self, model: str, sizes: Sizes, out_dir: Path, cache: Path | None = None) -> None:
        self.model, self.sizes, self.out_dir, self.cache = model, sizes, out_dir, cache
        self.results: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, str] = {}

    def get(self, label: str) -> dict[str, Any]:
        if label not in self.results and label not in self.failures:
            try:
                model_dir, quantization = checkpoint(label, self.model, self.cache)
                self.results[label] = run_engine(label, model_dir, quantization, self.sizes, self.out_dir)
            except (RuntimeError, SystemExit, subprocess.SubprocessError, OSError) as failure:
                self.failures[label] = f"{label}: {failure}"
        if label in self.failures:
            raise RuntimeError(self.failures[label])
        return self.results[label]
