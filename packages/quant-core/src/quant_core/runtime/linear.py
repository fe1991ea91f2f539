"""``QuantLinear``: an ``nn.Linear`` stand-in whose forward is a linear scheme's ``apply``."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quant_core.schemes.base import LinearScheme


class QuantLinear(nn.Module):
    """Holds ``(scheme, runtime)``; ``forward(x) = scheme.apply(runtime, x, bias)``.

    ``runtime`` is what ``scheme.process_weights`` returned; it stays a plain attribute (not parameters or buffers),
    so ``model.to(device)`` does not move it: load onto the device you run on. ``bias`` is the checkpoint's float
    bias (the model's own, or one msModelSlim's anti-outlier pass added); whether it is added is the scheme's
    contract (static ``W8A8`` folds it into ``quant_bias`` and ignores it here, as vLLM does).
    """

    def __init__(self, scheme: LinearScheme, runtime: Mapping[str, Any], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.runtime = runtime
        config = runtime.kernel.config
        self.in_features, self.out_features = config.in_features, config.out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheme.apply(self.runtime, x, self.bias)

    def extra_repr(self) -> str:
        kernel = self.runtime.kernel.name
        return (
            f"{self.scheme.quant_type}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={kernel}"
        )
