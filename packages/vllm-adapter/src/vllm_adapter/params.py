"""quant-core ``TensorSpec`` -> vLLM parameter with the loader semantics its sharding needs."""

import torch
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
    RowvLLMParameter,
)

from quant_core import CheckpointTensorError, TensorSpec


def checkpoint_dtype(spec: TensorSpec, stored: torch.dtype | None, where: str) -> torch.dtype:
    """The dtype to allocate: the checkpoint's own when the spec accepts it (v0 bf16 scales, int64 ``deq_scale``),
    so vLLM's loader copies bits rather than converting values."""
    allowed = (spec.dtype, *spec.accepted_dtypes)
    if stored is None:
        return spec.dtype
    if stored not in allowed:
        raise CheckpointTensorError(
            f"tensor {where!r} is stored as {stored}, expected {' or '.join(map(str, allowed))}. The description's "
            "quant type does not match how this tensor was written."
        )
    return stored


def make_parameter(spec: TensorSpec, dtype: torch.dtype, weight_loader, num_shards: int = 1) -> BasevLLMParameter:
    """A vLLM parameter for a linear layer's checkpoint tensor."""
    if spec.per_shard_scalar:  # one slot per fused shard (q, k, v each bring their own scalar)
        return PerTensorScaleParameter(data=torch.empty(num_shards, dtype=dtype), weight_loader=weight_loader)
    data = torch.empty(spec.shape, dtype=dtype)
    if spec.packed_dim is not None:
        return PackedvLLMParameter(
            data=data, packed_factor=spec.packed_factor, packed_dim=spec.packed_dim, output_dim=spec.output_dim,
            input_dim=spec.input_dim, weight_loader=weight_loader,
        )  # fmt: skip
    if spec.output_dim is not None and spec.input_dim is not None:
        return ModelWeightParameter(
            data=data, output_dim=spec.output_dim, input_dim=spec.input_dim, weight_loader=weight_loader
        )
    if spec.output_dim is not None:
        return ChannelQuantScaleParameter(data=data, output_dim=spec.output_dim, weight_loader=weight_loader)
    if spec.input_dim is not None:
        return RowvLLMParameter(data=data, input_dim=spec.input_dim, weight_loader=weight_loader)
    return BasevLLMParameter(data=data, weight_loader=weight_loader)
