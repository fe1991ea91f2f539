"""Kernels and the chooser (in the style of vLLM's kernel chooser).

A scheme lists its kernels in priority order. Each kernel says whether it can serve a layer,
``can_implement(config) -> (ok, reason)``; :func:`choose_kernel` takes the first that can and, when none
can, raises with every kernel's reason. ``backend="auto"`` tries the kernels that suit the weights' device
(``npu`` kernels for NPU tensors; ``cpu`` then ``reference`` elsewhere); an explicit backend tries only its own.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from quant_core.errors import QuantCoreError

AUTO_ORDER = {"npu": ("npu", "reference"), "cpu": ("cpu", "reference")}
AmaxReduce = Callable[[torch.Tensor], torch.Tensor]


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
    """A layer's processed tensors, plus the kernel bound to them (``runtime.kernel``).

    ``amax_reduce`` (None by default; an adapter sets the attribute after ``process_weights``) is for a layer that
    holds only part of each input row, ``x[:, K_r]`` (a row-parallel layer under tensor parallelism): it maps this
    part's per-token ``amax|x_r|`` (float32 ``[M, 1]``) to the whole row's, i.e. the max over the parts (an
    all-reduce MAX), and returns a tensor the caller may modify. Every kernel that quantizes activations with a
    per-token scale passes its local amax through it before computing the scale (once per ``run``; once per token
    chunk where an NPU op limits the tokens per call, the same on every part), so each part is quantized on the
    whole row's grid and the parts' outputs sum to the unsplit layer's. Kernels without per-token scales (static,
    weight-only, per-32-block MX) never call it.
    """

    def __init__(self, tensors: Mapping[str, Any], kernel: LinearKernel, amax_reduce: AmaxReduce | None = None) -> None:
        super().__init__(tensors)
        self.kernel = kernel
        self.amax_reduce = amax_reduce


def amax_reducer(runtime: Mapping[str, Any]) -> AmaxReduce | None:
    """``runtime.amax_reduce`` (None for a plain mapping)."""
    return getattr(runtime, "amax_reduce", None)


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
