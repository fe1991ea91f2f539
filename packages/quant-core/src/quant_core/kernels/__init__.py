"""Kernels behind a chooser: ``reference`` (the spec in plain torch), ``cpu`` (fast CPU ops), ``npu`` (torch_npu)."""

from quant_core.kernels.base import (
    AmaxReduce,
    KernelUnavailableError,
    LinearKernel,
    LinearKernelConfig,
    Runtime,
    choose_kernel,
)

__all__ = ["AmaxReduce", "KernelUnavailableError", "LinearKernel", "LinearKernelConfig", "Runtime", "choose_kernel"]
