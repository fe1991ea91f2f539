"""The scheme contracts: what every linear, MoE and KV-cache scheme provides, with no framework in sight.

A scheme's life cycle, the same for every layer kind:

1. ``weight_specs(...)`` -> ``{name: TensorSpec}``: exactly the checkpoint tensors of one layer;
2. ``quantize_weights(...)``: float weights -> those tensors, in msModelSlim's v1 layout (the quantizer);
3. ``process_weights(tensors)``: checkpoint tensors (v0 or v1) -> the runtime tensors the kernel wants;
4. ``apply(runtime, ...)``: the forward computation.

Constructor options every scheme accepts: ``backend`` (``"auto"``, ``"reference"``, ``"cpu"``, ``"npu"``)
and the description's globals ``version`` and ``group_size`` (ignored where they do not matter).
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from quant_core.spec import TensorSpec

BACKENDS = ("auto", "reference", "cpu", "npu")


class Scheme(ABC):
    """Options shared by all schemes. Subclasses add their own keyword-only options."""

    layer_kind: ClassVar[str]
    quant_type: ClassVar[str] = ""

    def __init__(self, *, backend: str = "auto", version: str = "0", group_size: int = 0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
            raise ValueError(f"group_size must be a non-negative integer, got {group_size!r}")
        self.backend = backend
        self.version = str(version)
        self.group_size = group_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, version={self.version!r})"


class LinearScheme(Scheme):
    """A quantized ``y = x Wᵀ + b`` with ``W`` of shape ``[out_features, in_features]``."""

    layer_kind = "linear"

    @abstractmethod
    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        """The checkpoint tensors of one layer, keyed by suffix (``weight``, ``weight_scale``, ...)."""

    @abstractmethod
    def quantize_weights(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, **calibration: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Float ``[N, K]`` weight (and bias, calibration statistics) -> checkpoint tensors (v1 layout)."""

    @abstractmethod
    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> dict[str, torch.Tensor]:
        """Checkpoint tensors as loaded -> runtime tensors. ``layer`` (the module prefix) names it in errors."""

    @abstractmethod
    def apply(
        self, runtime: Mapping[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x [..., K]`` -> ``y [..., N]`` in ``x``'s dtype."""


class MoEScheme(Scheme):
    """Quantized routed experts, stacked: ``w13 [E, 2I, H]`` (gate rows, then up rows), ``w2 [E, H, I]``."""

    layer_kind = "moe"

    @abstractmethod
    def weight_specs(
        self, num_experts: int, hidden_size: int, intermediate_size: int, params_dtype: torch.dtype
    ) -> dict[str, TensorSpec]:
        """The stacked checkpoint tensors (``w13_weight``, ``w2_weight``, their scales, ...)."""

    @abstractmethod
    def quantize_weights(self, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float stacked experts -> stacked checkpoint tensors."""

    @abstractmethod
    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> dict[str, torch.Tensor]:
        """Stacked checkpoint tensors -> runtime tensors."""

    @abstractmethod
    def apply(
        self,
        runtime: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
    ) -> torch.Tensor:
        """``x [T, H]`` routed to ``topk_ids [T, k]`` with ``topk_weights [T, k]`` -> ``[T, H]``."""


class AttentionScheme(Scheme):
    """A quantized KV cache: per-layer scales, and the conversions into and out of the cache dtype."""

    layer_kind = "attention"

    @abstractmethod
    def weight_specs(self, num_kv_heads: int, head_dim: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        """The checkpoint tensors of one attention layer (e.g. C8 ``k_cache_scale``)."""

    @abstractmethod
    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> runtime tensors."""

    @abstractmethod
    def quantize_kv(
        self, runtime: Mapping[str, torch.Tensor], key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value [T, kv_heads, head_dim]`` -> their cache representation."""

    @abstractmethod
    def dequantize_kv(
        self, runtime: Mapping[str, torch.Tensor], key: torch.Tensor, value: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache representation -> float ``key``/``value`` in ``dtype``."""


SCHEME_BASES: dict[str, type[Scheme]] = {
    "linear": LinearScheme,
    "moe": MoEScheme,
    "attention": AttentionScheme,
}
