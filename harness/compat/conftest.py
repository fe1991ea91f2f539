"""Options of the compat session and its report (printed at the end, written to --compat-report)."""

import time
from pathlib import Path

import pytest

from harness.compat.report import REPORT

ROOT = Path(__file__).parents[2]


def pytest_addoption(parser):
    parser.addoption(
        "--compat-report",
        default=str(ROOT / "build" / "compat" / "report.md"),
        help="write the scheme × producer table (markdown) here",
    )
    parser.addoption("--no-engine", action="store_true", help="leave out the vLLM engine check (no vLLM installed)")


def pytest_configure(config):
    config.addinivalue_line("markers", "format_gap: a format msModelSlim writes that quant-core has no scheme for")
    config._compat_start = time.perf_counter()


def pytest_terminal_summary(terminalreporter, config):
    if not REPORT.rows:
        return
    seconds = time.perf_counter() - config._compat_start
    REPORT.setup.append(f"Session wall time: {seconds:.0f} s.")
    terminalreporter.write_sep("=", "msModelSlim compatibility")
    terminalreporter.write_line("\n".join(REPORT.setup))
    terminalreporter.write_line(REPORT.table())
    path = Path(config.getoption("--compat-report"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(REPORT.markdown("msModelSlim 26.1.0 compatibility"))
    terminalreporter.write_line(f"report written to {path}")


@pytest.fixture(scope="session")
def selected_cases(request) -> list[str]:
    """The case names of the tests this session runs, in order (msModelSlim runs are prefetched in that order)."""
    names = []
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case is not None and case.name not in names:
            names.append(case.name)
    return names
