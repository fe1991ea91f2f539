"""Prints each benchmark's median as a ratio to the fp32 F.linear baseline of the same shape, measured in the
same run; `--ratio-report PATH` also writes the table as markdown."""

import os

import torch


def pytest_addoption(parser):
    parser.addoption("--ratio-report", default=None, help="write the ratio table (markdown) to this file")


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))


def ratio_table(benchmarks) -> str:
    """One markdown table per kind (linear, moe): rows are schemes, columns shape × M, cells ratio (median)."""
    medians = {}
    for bench in benchmarks:
        info = bench.extra_info
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
