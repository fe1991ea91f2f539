"""Prints each kernel benchmark's median as a ratio to the fp32 F.linear baseline of the same shape, measured in the
same run; `--ratio-report PATH` also writes the table as markdown.

The end-to-end benchmarks (test_e2e_perf.py) share one `e2e_results` session fixture; at the end of the session their
results, ratios to float and speed targets go to `--perf-out` (default build/perf): e2e.json, e2e_ratio.png and
summary.md (the end-to-end table and the kernel ratio tables, ready to paste into the README).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from harness.configs import ROOT
from harness.demo import cpu_threads
from harness.perf import e2e, report

E2E_RUNS = pytest.StashKey[e2e.EngineRuns]()
KERNEL_KINDS = ("linear", "moe")


def pytest_addoption(parser):
    parser.addoption("--ratio-report", default=None, help="write the ratio table (markdown) to this file")
    group = parser.getgroup("e2e", "end-to-end vLLM throughput (test_e2e_perf.py)")
    group.addoption("--e2e-model", default="smollm2-135m", help="a harness/configs/<model> directory")
    group.addoption(
        "--e2e-schemes",
        default=",".join(e2e.DEFAULT_SCHEMES),
        help="comma-separated schemes besides float, or `all` configured (default %(default)s)",
    )
    group.addoption("--e2e-small", action="store_true", help="128-token prompts, 16 decode steps, 2 repeats")
    group.addoption("--e2e-no-peer", action="store_true", help="skip the compressed-tensors W8A8 peer")
    group.addoption("--perf-out", default=str(ROOT / "build" / "perf"), help="report directory (default build/perf)")


def pytest_configure(config):
    """Kernel threads: $BENCH_THREADS, else what the e2e engines get (the cores less the one vLLM keeps for its
    scheduler, `harness.demo.cpu_threads`): on a busy 2-core machine two threads make every parallel region wait
    for a descheduled one, and medians snap to multiples of the scheduler tick (~12 ms)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", cpu_threads())))


def ratio_table(benchmarks) -> str:
    """One markdown table per kind (linear, moe): rows are schemes, columns shape × M, cells ratio (median)."""
    medians = {}
    for bench in benchmarks:
        info = bench.extra_info
        if info.get("kind") not in KERNEL_KINDS:
            continue
        medians[(info["kind"], info["scheme"], info["shape"], info["M"])] = bench.stats.median
    tables = []
    for kind in sorted({key[0] for key in medians}):
        columns = sorted({(shape, m) for k, _, shape, m in medians if k == kind})
        schemes = sorted({s for k, s, _, _ in medians if k == kind}, key=lambda s: (s != "fp32", s))
        lines = [
            f"| {kind} | " + " | ".join(f"{shape} M={m}" for shape, m in columns) + " |",
            "|" + "---|" * (len(columns) + 1),
        ]
        for scheme in schemes:
            cells = []
            for shape, m in columns:
                median, base = medians.get((kind, scheme, shape, m)), medians.get((kind, "fp32", shape, m))
                cells.append(f"{median / base:.2f}x ({median * 1e3:.2f} ms)" if median and base else "—")
            lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


@pytest.fixture(scope="session")
def e2e_results(pytestconfig) -> e2e.EngineRuns:
    sizes = e2e.SMALL if pytestconfig.getoption("--e2e-small") else e2e.FULL
    runs = e2e.EngineRuns(pytestconfig.getoption("--e2e-model"), sizes, Path(pytestconfig.getoption("--perf-out")))
    pytestconfig.stash[E2E_RUNS] = runs
    return runs


def write_e2e(runs: e2e.EngineRuns, out: Path) -> str:
    """e2e.json and e2e_ratio.png in `out`; returns the markdown summary."""
    meta = e2e.meta(runs.results, runs.model, runs.sizes)
    document = {
        "meta": meta,
        "ratios_to_float": report.ratios(runs.results),
        "targets": report.check_targets(runs.results),
        "failures": runs.failures,
        "results": runs.results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(document, indent=2) + "\n")
    if report.FLOAT in runs.results:
        report.plot(runs.results, out / "e2e_ratio.png")
    return report.summary(runs.results, meta)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    sections = []
    runs = config.stash.get(E2E_RUNS, None)
    if runs is not None and runs.results:
        sections.append(write_e2e(runs, Path(config.getoption("--perf-out"))))
        terminalreporter.write_sep("=", "end-to-end tokens/s (ratio to float, same run)")
        terminalreporter.write_line(sections[-1])
    table = ratio_table(session.benchmarks) if session and session.benchmarks else ""
    if table:
        terminalreporter.write_sep("=", "median time / fp32 F.linear median (same shape, same run; < 1 is faster)")
        terminalreporter.write_line(table)
        kernels = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        title = "### Kernels: median time / fp32 median (same shape, same run; < 1 is faster)"
        sections.append(f"{title}\n\n{table}\n\n{kernels}\n")
        path = config.getoption("--ratio-report")
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{kernels}\n\n{table}\n")
    if sections:
        summary = Path(config.getoption("--perf-out")) / "summary.md"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("\n".join(sections))
        terminalreporter.write_line(f"summary for the README: {summary}")
