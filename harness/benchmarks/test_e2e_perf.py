"""End-to-end vLLM throughput: float, each scheme (`--e2e-schemes`) and the compressed-tensors W8A8 peer
(nox -s perf). One test per model × run ("prefill-b1", "decode-b1", "prefill-b8", "decode-b8").

Each model's engine runs once, in its own subprocess (`harness.perf.e2e`), the first time one of its tests needs it;
its raw timings then become that test's pytest-benchmark rounds, so `--benchmark-json`, `--benchmark-compare` and
`--benchmark-compare-fail` treat them like any other benchmark. A round is one prefill of the batch (seconds) or one
decode engine step of the batch (seconds per step). Ratios to float, the speed targets, `e2e.json`, `summary.md`
and the plot are written at the end of the session (conftest.py).
"""

import importlib.util

import pytest

from harness.perf import e2e
from harness.perf.report import FLOAT

RUNS = [f"{kind}-b{batch}" for batch in e2e.BATCHES for kind in ("prefill", "decode")]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (nox -s perf)")


def pytest_generate_tests(metafunc):
    if "e2e_case" in metafunc.fixturenames:
        option = metafunc.config.getoption
        models = e2e.labels(option("--e2e-model"), option("--e2e-schemes"), not option("--e2e-no-peer"))
        cases = [(label, run) for label in models for run in RUNS]
        size = "-small" if option("--e2e-small") else ""  # other sizes, other names: never compared with full runs
        metafunc.parametrize("e2e_case", cases, ids=[f"{label}-{run}{size}" for label, run in cases])


def record(benchmark, samples: list[float]) -> None:
    """Hand timings measured in the engine subprocess to pytest-benchmark as its rounds (one iteration each).

    pytest-benchmark (pinned 5.3.1 in noxfile.py) only times callables it runs itself; `_make_stats` is the method
    its own `pedantic` uses to open a result, so the saved JSON and the compare machinery see ordinary benchmarks."""
    stats = benchmark._make_stats(1)
    for sample in samples:
        stats.update(sample)
    benchmark._mode = "harness.perf samples"


def test_e2e(benchmark, e2e_results, e2e_case):
    label, run = e2e_case
    result = e2e_results.get(label)
    measured = result["runs"][run]
    base = e2e_results.get(FLOAT)["runs"][run]
    benchmark.group = f"e2e {run}"
    benchmark.extra_info.update(
        kind="e2e", label=label, run=run, tokens_per_step=measured["tokens_per_step"], tps=measured["tps"],
        ratio_to_float=measured["tps"] / base["tps"],
    )  # fmt: skip
    if benchmark.enabled:
        record(benchmark, measured["samples"])
    assert measured["tps"] > 0
