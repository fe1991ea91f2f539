"""Prints each benchmark's median as a ratio to the fp32 F.linear baseline of the same shape, measured in the
same run; `--ratio-report PATH` also writes the table as markdown."""

import os
from collections import defaultdict

import torch


def pytest_addoption(parser):
    parser.addoption("--ratio-report", default=None, help="write the ratio table (markdown) to this file")


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))


def ratio_table(benchmarks) -> str:
    medians = {}
    for bench in benchmarks:
        info = bench.extra_info
        medians[(info["kind"], info["scheme"], info["shape"], info["M"])] = bench.stats.median
    rows = defaultdict(dict)
    columns = sorted({(shape, m) for _, _, shape, m in medians})
    for (kind, scheme, shape, m), median in medians.items():
        base = medians.get((kind, "fp32", shape, m))
        if base:
            rows[(kind, scheme)][(shape, m)] = (median / base, median)
    head = "| kind | scheme | " + " | ".join(f"{s} M={m}" for s, m in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for (kind, scheme), cells in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "fp32", kv[0][1])):
        fmt = [f"{cells[c][0]:.2f}x ({cells[c][1] * 1e3:.2f} ms)" if c in cells else "—" for c in columns]
        lines.append(f"| {kind} | {scheme} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if not session or not session.benchmarks:
        return
    table = ratio_table(session.benchmarks)
    terminalreporter.write_sep("=", "median time / fp32 F.linear median (same shape, same run; < 1 is faster)")
    terminalreporter.write_line(table)
    path = config.getoption("--ratio-report")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n{table}\n")
