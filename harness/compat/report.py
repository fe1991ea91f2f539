"""The scheme × producer table the compat session prints and writes to build/compat/report.md."""

from dataclasses import dataclass, field


@dataclass
class Row:
    case: str
    producer: str  # "msModelSlim" or "quant-core"
    types: str = ""
    run: str = ""  # "ok", "cached", or the failure
    seconds: float | None = None
    load: str = ""  # "ok" or the exception
    error: str = ""  # logit error vs the float model
    bound: str = ""
    checks: str = ""  # structure / description / code agreement against msModelSlim
    engine: str = ""  # vLLM engine vs load_quantized on the same checkpoint: "ok ..." or the failure


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # environment, models, timings

    def table(self) -> str:
        header = ["case", "producer", "types", "run", "time (s)", "load", "logit error vs float", "bound"]
        header += ["vLLM engine vs load_quantized", "checks"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
            cells = [row.case, row.producer, row.types, row.run, seconds, row.load, row.error, row.bound]
            cells += [row.engine, row.checks]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return "\n".join(lines)

    def markdown(self, title: str) -> str:
        parts = [f"# {title}", "", *self.setup, "", self.table()]
        if self.failures:
            parts += ["", "## Failures", ""]
            for case, problems in self.failures.items():
                parts += [f"- **{case}**", *(f"  - {_cell(p, 2000)}" for p in problems)]
        return "\n".join(parts) + "\n"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


REPORT = Report()
