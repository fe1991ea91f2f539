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


class ShardSlotsParameter(BasevLLMParameter):
    """A tensor every shard of a fused layer carries whole (a FlatQuant transform of the shared input): one slot per
    shard, ``[num_shards, *shape]``, so the method can check that the shards agree instead of keeping the last."""

    def load_qkv_weight(self, loaded_weight: torch.Tensor, shard_id, **kwargs) -> None:
        self.data[self._shard_id_as_int(shard_id)].copy_(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, shard_id, **kwargs) -> None:
        self.data[self._shard_id_as_int(shard_id)].copy_(loaded_weight)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self.data.copy_(loaded_weight.expand_as(self.data))

    load_row_parallel_weight = load_column_parallel_weight


def is_whole_per_shard(spec: TensorSpec, num_shards: int) -> bool:
    """Whether a fused layer keeps one copy of ``spec`` per shard (see :class:`ShardSlotsParameter`)."""
    return num_shards > 1 and not spec.per_shard_scalar and spec.output_dim is None and spec.input_dim is None


class OutputShardParameter(BasevLLMParameter):
    """A row-parallel layer's tensor sharded along its output dim instead of the input dim (a FlatQuant layer keeps
    whole input rows, see ``linear.py``): this rank's ``shape[output_dim]`` slice, packed rows counted as stored."""

    def __init__(self, output_dim: int, **kwargs) -> None:
        self.output_dim = output_dim
        super().__init__(**kwargs)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        size = self.data.shape[self.output_dim]
        self._assert_and_load(loaded_weight.narrow(self.output_dim, self.tp_rank * size, size))


def make_parameter(
    spec: TensorSpec, dtype: torch.dtype, weight_loader, num_shards: int = 1, *, whole_rows: bool = False
) -> BasevLLMParameter:
    """A vLLM parameter for a linear layer's checkpoint tensor. ``whole_rows``: the row-parallel layer splits N, not
    K (its tensors along N are :class:`OutputShardParameter`, the others whole on every rank)."""
    if whole_rows:
        data = torch.empty(spec.shape, dtype=dtype)
        if spec.output_dim is None:
            return BasevLLMParameter(data=data, weight_loader=weight_loader)
        return OutputShardParameter(data=data, output_dim=spec.output_dim, weight_loader=weight_loader)
    if spec.per_shard_scalar:  # one slot per fused shard (q, k, v each bring their own scalar)
        return PerTensorScaleParameter(data=torch.empty(num_shards, dtype=dtype), weight_loader=weight_loader)
    if is_whole_per_shard(spec, num_shards):
        return ShardSlotsParameter(data=torch.empty(num_shards, *spec.shape, dtype=dtype), weight_loader=weight_loader)
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
