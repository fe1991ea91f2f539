"""Ratio tables, the issue's speed targets, the markdown summary and the plot of the end-to-end benchmarks.

Input everywhere: `results`, label -> the JSON `harness.perf.speed` writes (its `runs` map "prefill-b1", "decode-b8",
... to `{"batch", "tokens_per_step", "samples", "tps"}`). Ratios are tokens/s over the float model's tokens/s for
the same run key, measured in the same session (> 1 is faster than float).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLOAT = "FLOAT"
PEER = "PEER_CT_W8A8"
TITLES = {FLOAT: "float (fp32)", PEER: "compressed-tensors W8A8 (peer)"}


@dataclass(frozen=True)
class Target:
    """`label`'s tokens/s on `run` divided by `versus`'s must be at least `minimum`."""

    label: str
    run: str
    versus: str
    minimum: float

    def describe(self) -> str:
        return f"{self.label} {self.run} ≥ {self.minimum:g}× {TITLES.get(self.versus, self.versus)}"


TARGETS = (
    Target("W8A8_DYNAMIC", "decode-b1", FLOAT, 1.5),
    Target("W8A8_DYNAMIC", "decode-b1", PEER, 3.0),
    Target("W8A8_DYNAMIC", "prefill-b1", FLOAT, 1.3),
)


def run_keys(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every run key present, prefill before decode, then by batch."""
    keys = {key for result in results.values() for key in result["runs"]}
    return sorted(keys, key=lambda k: (not k.startswith("prefill"), int(k.rsplit("-b", 1)[1])))


def tps(results: dict[str, dict[str, Any]], label: str, key: str) -> float | None:
    run = results.get(label, {}).get("runs", {}).get(key)
    return run["tps"] if run else None


def ratio(results: dict[str, dict[str, Any]], label: str, key: str, versus: str = FLOAT) -> float | None:
    a, b = tps(results, label, key), tps(results, versus, key)
    return a / b if a is not None and b else None


def ratios(results: dict[str, dict[str, Any]], versus: str = FLOAT) -> dict[str, dict[str, float | None]]:
    return {label: {key: ratio(results, label, key, versus) for key in run_keys(results)} for label in results}


def check_targets(results: dict[str, dict[str, Any]], targets=TARGETS) -> list[dict[str, Any]]:
    """One entry per target whose two models were measured: the ratio and whether it meets the minimum."""
    checked = []
    for target in targets:
        value = ratio(results, target.label, target.run, target.versus)
        if value is not None:
            checked.append({"target": target.describe(), "ratio": value, "met": value >= target.minimum})
    return checked


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model, one column per run key, cells `tokens/s (ratio to float)`."""
    keys = run_keys(results)
    lines = ["| model | " + " | ".join(header(results, k) for k in keys) + " |", "|---" + "|---:" * len(keys) + "|"]
    for label in sorted(results, key=lambda x: (x != FLOAT, x == PEER, x)):
        cells = []
        for key in keys:
            value, r = tps(results, label, key), ratio(results, label, key)
            cells.append("—" if value is None else f"{value:.1f}" + (f" ({r:.2f}×)" if r is not None else ""))
        lines.append(f"| {TITLES.get(label, label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(results: dict[str, dict[str, Any]], key: str) -> str:
    kind, batch = key.rsplit("-b", 1)
    run = next(r["runs"][key] for r in results.values() if key in r["runs"])
    return f"{kind} b{batch} ({run['tokens_per_step']} tok/step)"


def summary(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "### End-to-end throughput in vLLM (tokens/s; ratio to float in the same run)",
        "",
        table(results),
        "",
    ]
    for entry in check_targets(results):
        lines.append(f"- target {entry['target']}: {entry['ratio']:.2f}× — {'met' if entry['met'] else 'NOT met'}")
    sizes = meta.get("sizes", {})
    lines += [
        "",
        f"{meta.get('model', '?')}, {meta.get('vllm', '?')}, dtype float32, in-process engine, "
        f"{meta.get('threads', '?')} torch thread(s), greedy, EOS ignored, after a warm-up. Prefill: "
        f"{sizes.get('prefill_len', '?')}-token prompts, batch of distinct prompts submitted together, "
        "tokens / time until every request has its first token. Decode: 16-token prompts, "
        f"{sizes.get('decode_tokens', '?')} tokens each, batch / median time per engine step. Median over "
        f"{sizes.get('repeats', '?')} repeats. Load average (1 min) during the runs: {meta.get('loadavg', '?')}; "
        "timings on a shared machine are noisy.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Ratio to float (log y) vs tokens per engine step (log x): decode at batch 1 and 8, prefill at batch 1 and 8."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label in sorted(results, key=lambda x: (x == PEER, x)):
        if label == FLOAT:
            continue
        points = sorted(
            (results[label]["runs"][key]["tokens_per_step"], r)
            for key, r in ratios(results)[label].items()
            if r is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=TITLES.get(label, label))
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="float")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×" if v in (0.5, 2, 3, 5) else ""))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("tokens per engine step (decode b1, b8; prefill b1, b8)")
    ax.set_ylabel("tokens/s ÷ float tokens/s")
    ax.set_title("vLLM end-to-end throughput vs float (> 1 is faster)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
