"""Recovery gates: a quantized scheme against the float model measured in the same run, on the same items.

Perplexity: `ppl_ratio = ppl(scheme) / ppl(float)` must be `<= ppl_ratio_max`. Both runs score the same documents,
so the ratio is a paired measurement with little sampling noise. `ppl_ratio_min` is the reverse check, for a baseline
recipe that is expected to stay broken (so that a better recipe's gain over it is measured, not assumed).

Accuracy: `recovery = acc(scheme) / acc(float)`. A raw `recovery >= acc_ratio_min` would fail at random on small
samples (stderr ~0.07 at n = 50), so the gate allows what sampling noise explains at the sample size: the scheme
passes iff `acc(scheme) >= wilson_lower(acc_ratio_min * acc(float), n)`, the one-sided Wilson score lower bound
for a proportion `acc_ratio_min * acc(float)` observed on `n` items. As n grows the floor tends to
`acc_ratio_min * acc(float)`; a scheme at chance level fails at any sample size of a few hundred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_ONE_SIDED_95 = 1.6448536269514722  # standard normal quantile 0.95


@dataclass(frozen=True)
class Gate:
    """One gate's verdict. `value` is the scheme's ratio to float, `bound` what it was compared with."""

    task: str
    metric: str  # "ppl_ratio" or "acc_ratio"
    value: float
    op: str  # "<=" or ">=": how value must compare with bound
    bound: float
    passed: bool
    rule: str


def ratio(scheme: float, float_: float) -> float:
    """`scheme / float_`; NaN when the float value is 0 (nothing to recover)."""
    return scheme / float_ if float_ else math.nan


def wilson_lower(p: float, n: int, z: float = Z_ONE_SIDED_95) -> float:
    """One-sided Wilson score lower bound of a proportion `p` observed on `n` trials."""
    if n <= 0:
        raise ValueError(f"sample size must be positive, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a proportion lies in [0, 1], got {p}")
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def accuracy_floor(acc_float: float, n: int, ratio_min: float, z: float = Z_ONE_SIDED_95) -> float:
    """The lowest scheme accuracy that still passes: the Wilson lower bound of `ratio_min * acc_float` at `n`."""
    return wilson_lower(min(1.0, ratio_min * acc_float), n, z)


def ppl_gate(task: str, ppl_scheme: float, ppl_float: float, ratio_max: float) -> Gate:
    value = ratio(ppl_scheme, ppl_float)
    return Gate(task, "ppl_ratio", value, "<=", ratio_max, value <= ratio_max, f"ppl ratio <= {ratio_max:g}")


def ppl_floor_gate(task: str, ppl_scheme: float, ppl_float: float, ratio_min: float) -> Gate:
    """The reverse check (`ppl_ratio_min`): the scheme must be at least this much worse than float."""
    value = ratio(ppl_scheme, ppl_float)
    return Gate(task, "ppl_ratio", value, ">=", ratio_min, value >= ratio_min, f"ppl ratio >= {ratio_min:g}")


def accuracy_gate(
    task: str, acc_scheme: float, acc_float: float, n: int, ratio_min: float, z: float = Z_ONE_SIDED_95
) -> Gate:
    """Passes iff `acc_scheme >= accuracy_floor(...)`; `bound` is that floor expressed as a ratio to float."""
    floor = accuracy_floor(acc_float, n, ratio_min, z)
    passed = acc_scheme >= floor
    rule = f"acc >= wilson_lower({ratio_min:g} × float, n={n}) = {floor:.4f}"
    return Gate(task, "acc_ratio", ratio(acc_scheme, acc_float), ">=", ratio(floor, acc_float), passed, rule)
