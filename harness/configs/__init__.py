"""Per model × scheme run configurations: `harness/configs/<model>/<scheme>.yaml`.

Keys: `model` (a name `harness.prepare` knows), `scheme` (`FLOAT` for the baseline), `quantize` (keyword arguments of
`quant_core.quantize.quantize_model`; paths relative to the repository root), and for the accuracy session
`tasks`, `limits`, `gates` (the targets, enforced by the full run) and `smoke_gates` (what CI's `--smoke` cut enforces
on its few items: a regression guard, looser where the target is not met yet or the smoke sample is noisier; the
gates apply when absent). The demo and the accuracy session read the same files, so both quantize alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).parent
ROOT = CONFIGS.parent.parent
PATH_OPTIONS = ("calib",)


@dataclass(frozen=True)
class RunConfig:
    model: str
    scheme: str
    quantize: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()
    limits: dict[str, int] = field(default_factory=dict)
    gates: dict[str, float] = field(default_factory=dict)
    smoke_gates: dict[str, float] | None = None
    gated_tasks: tuple[str, ...] | None = None  # the tasks the gates apply to (None: all); the rest is reported
    path: Path | None = None

    def gates_for(self, smoke: bool) -> dict[str, float]:
        return self.smoke_gates if smoke and self.smoke_gates is not None else self.gates

    def gated(self, task: str) -> bool:
        return self.gated_tasks is None or task in self.gated_tasks

    def quantize_options(self) -> dict[str, Any]:
        """`quantize` with repository-relative paths made absolute."""
        return {k: str(ROOT / v) if k in PATH_OPTIONS else v for k, v in self.quantize.items()}


def config_path(model: str, scheme: str) -> Path:
    return CONFIGS / model / f"{scheme.lower()}.yaml"


def load(model: str, scheme: str) -> RunConfig:
    path = config_path(model, scheme)
    if not path.is_file():
        known = ", ".join(sorted(p.stem.upper() for p in (CONFIGS / model).glob("*.yaml"))) or "none"
        raise SystemExit(f"no configuration {path} for {model} × {scheme}; configured schemes: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"model", "scheme", "quantize", "tasks", "limits", "gates", "smoke_gates", "gated_tasks"}
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}")
    return RunConfig(
        model=raw["model"],
        scheme=raw["scheme"],
        quantize=dict(raw.get("quantize") or {}),
        tasks=tuple(raw.get("tasks") or ()),
        limits=dict(raw.get("limits") or {}),
        gates=dict(raw.get("gates") or {}),
        smoke_gates=None if raw.get("smoke_gates") is None else dict(raw["smoke_gates"]),
        gated_tasks=None if raw.get("gated_tasks") is None else tuple(raw["gated_tasks"]),
        path=path,
    )


def schemes(model: str) -> list[str]:
    """Every configured scheme of `model`, FLOAT first."""
    found = sorted(p.stem.upper() for p in (CONFIGS / model).glob("*.yaml"))
    return sorted(found, key=lambda s: s != "FLOAT")
