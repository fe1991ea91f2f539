"""Kernels and the chooser (in the style of vLLM's kernel chooser).

A scheme lists its kernels in priority order. Each kernel says whether it can serve a layer,
``can_implement(config) -> (ok, reason)``; :func:`choose_kernel` takes the first that can and, when none
can, raises with every kernel's reason. ``backend="auto"`` tries the kernels that suit the weights' device
(``npu`` kernels for NPU tensors; ``cpu`` then ``reference`` elsewhere); an explicit backend tries only its own.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from quant_core.errors import QuantCoreError

AUTO_ORDER = {"npu": ("npu", "reference"), "cpu": ("cpu", "reference")}


class KernelUnavailableError(QuantCoreError, RuntimeError):
    """No kernel can serve a layer with the requested backend."""


@dataclass(frozen=True)
class LinearKernelConfig:
    """What a linear kernel decides on."""

    quant_type: str
    in_features: int
    out_features: int
    group_size: int = 0
    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)


class LinearKernel(ABC):
    """One implementation of a linear scheme's forward. An instance is bound to one layer's tensors."""

    name: ClassVar[str]
    backend: ClassVar[str]  # "reference", "cpu" or "npu"

    def __init__(self, config: LinearKernelConfig) -> None:
        self.config = config

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> tuple[bool, str]:
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The scheme's canonical runtime tensors -> what :meth:`run` reads (transposed, packed, ...)."""
        return tensors

    @abstractmethod
    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]`` (any float dtype; the scheme casts to ``x``'s dtype)."""


class Runtime(dict):
    """A layer's processed tensors, plus the kernel bound to them (``runtime.kernel``)."""

    def __init__(self, tensors: Mapping[str, Any], kernel: LinearKernel) -> None:
        super().__init__(tensors)
        self.kernel = kernel


def choose_kernel(
    kernels: Sequence[type[LinearKernel]], config: LinearKernelConfig, backend: str = "auto"
) -> type[LinearKernel]:
    """The first of ``kernels`` that serves ``config`` on ``backend``; raises listing every reason otherwise."""
    allowed = AUTO_ORDER.get(config.device, AUTO_ORDER["cpu"]) if backend == "auto" else (backend,)
    reasons = []
    for wanted in allowed:
        for kernel in kernels:
            if kernel.backend != wanted:
                continue
            ok, why = kernel.can_implement(config)
            if ok:
                return kernel
            reasons.append(f"{kernel.name}: {why}")
    skipped = sorted({k.backend for k in kernels} - set(allowed))
    if skipped:
        reasons.append(f"not tried (backend={backend!r}, device={config.device!r}): {', '.join(skipped)} kernels")
    raise KernelUnavailableError(
        f"no kernel for {config.quant_type} linear (K={config.in_features}, N={config.out_features}"
        + (f", group_size={config.group_size}" if config.group_size else "")
        + f") with backend={backend!r}:\n  "
        + "\n  ".join(reasons or ["no kernel registered for this backend"])
    )
