"""Plumbing shared by the linear schemes: checkpoint validation, kernel choice, reshaping in ``apply``.

A concrete scheme supplies ``weight_specs``, ``quantize_weights``, ``KERNELS`` (priority order) and
``canonicalize`` (checkpoint tensors -> the canonical runtime tensors every kernel of the scheme starts from).
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.base import LinearKernel, LinearKernelConfig, Runtime, choose_kernel
from quant_core.schemes.base import LinearScheme
from quant_core.spec import TensorSpec, check_tensors

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_spec(name: str, shape: tuple[int, ...], *, optional: bool = False, **dims: int | None) -> TensorSpec:
    """A float scale or offset: float32 as msModelSlim v1 writes it; v0's model dtype accepted too."""
    return TensorSpec(name, shape, torch.float32, accepted_dtypes=FLOAT_DTYPES[1:], optional=optional, **dims)


def check_scale(tensor: torch.Tensor, name: str, layer: str, *, positive: bool = True) -> torch.Tensor:
    """``tensor`` as float32, or an error naming it when it holds NaN/Inf (or, for scales, zero/negative values)."""
    t = tensor.float()
    where = f"{layer}.{name}" if layer else name
    if not torch.isfinite(t).all():
        raise CheckpointTensorError(
            f"tensor {where!r} contains NaN or Inf; the checkpoint is corrupted or was quantized from a diverged "
            "model. Re-quantize the layer."
        )
    if positive and not (t > 0).all():
        bad = int((t <= 0).sum())
        raise CheckpointTensorError(
            f"tensor {where!r} has {bad} zero or negative scale(s); every scale must be > 0 or the layer's output "
            "is garbage. Re-quantize the layer (a constant-zero channel still needs a positive scale)."
        )
    return t


class KernelLinearScheme(LinearScheme):
    KERNELS: ClassVar[tuple[type[LinearKernel], ...]]

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        """Validated checkpoint tensors -> canonical runtime tensors (float32 flattened scales, unpacked int4, ...)."""
        raise NotImplementedError

    def layer_shape(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """``(in_features, out_features)`` read off the checkpoint tensors."""
        n, k = tensors["weight"].shape
        return k, n

    def kernel_options(self) -> dict[str, Any]:
        return {}

    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> Runtime:
        k, n, canonical = self.checked_canonical(tensors, layer)
        config = LinearKernelConfig(
            self.quant_type, k, n, self.group_size, tensors["weight"].device.type, self.kernel_options()
        )
        kernel = choose_kernel(self.KERNELS, config, self.backend)(config)
        return Runtime(kernel.prepare(canonical), kernel)

    def checked_canonical(
        self, tensors: Mapping[str, torch.Tensor], layer: str = ""
    ) -> tuple[int, int, dict[str, torch.Tensor]]:
        """``(in_features, out_features, canonical tensors)`` after checking every tensor against the specs."""
        if "weight" not in tensors:
            raise CheckpointTensorError(
                f"layer {layer or '<layer>'!r} has no 'weight' tensor (got {', '.join(sorted(tensors)) or 'nothing'})."
            )
        if tensors["weight"].dim() != 2:
            raise CheckpointTensorError(
                f"tensor {layer + '.' if layer else ''}weight must be 2-D [out, in], got shape "
                f"{tuple(tensors['weight'].shape)}."
            )
        k, n = self.layer_shape(tensors)
        dtype = next((t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES), torch.float32)
        check_tensors(self.weight_specs(k, n, dtype), dict(tensors), layer)
        return k, n, self.canonicalize(tensors, layer)

    def apply(self, runtime: Mapping[str, Any], x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        kernel: LinearKernel | None = getattr(runtime, "kernel", None)
        if kernel is None:
            raise TypeError(f"{type(self).__name__}.apply needs the Runtime that process_weights returned")
        k, n = kernel.config.in_features, kernel.config.out_features
        if x.shape[-1] != k:
            raise ValueError(f"{self.quant_type} linear expects inputs with last dim {k}, got shape {tuple(x.shape)}")
        y = kernel.run(runtime, x.reshape(-1, k), bias)
        return y.reshape(*x.shape[:-1], n).to(x.dtype)
