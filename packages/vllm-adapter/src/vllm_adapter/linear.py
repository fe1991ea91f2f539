"""The linear method: registers a scheme's checkpoint tensors as vLLM parameters, then runs the scheme. The same for
a quantized ``lm_head`` (``ModelSlimEmbeddingMethod``).

Tensor parallelism: a column-parallel layer's tensors split along the output dim (vLLM's loaders do it), a
row-parallel layer's along the input dim, each by its own extent (``TensorSpec.shard_shape``: e.g. W4A8's
row-parallel ``scale_bias [N, 16]`` keeps 16/tp partial sums per rank, per-group scales K/g/tp groups). vLLM sums
the row-parallel ranks' outputs (all-reduce) and adds the bias on rank 0. Every scheme then computes exactly what
one rank would, up to float summation order:

* Static W8A8's ``quant_bias`` holds whole-row sums (activation zero point, folded bias): only rank 0 adds it, as
  the scheme's contract asks. Weight-only schemes' partial sums add up as they are.
* Per-token dynamic activations (W8A8_DYNAMIC, W8A8_MIX's dynamic mode, W4A8_DYNAMIC, W4A4_DYNAMIC,
  WFP8AFP8_DYNAMIC): a rank holds ``x[:, K_r]``, so the kernel's per-token amax goes through an all-reduce MAX over
  the tensor-parallel group (quant-core's ``Runtime.amax_reduce``; M floats per call) and every rank quantizes on
  the whole row's scale.
* FlatQuant (``W*_FLATQUANT_DYNAMIC``): the transform mixes the whole input row, so such a layer keeps whole rows
  and splits N instead. Each rank loads the full-K weights of its N/tp output columns (as many weight elements as
  K-sharding: no extra memory), all-gathers the input row (each rank receives M·K·(tp-1)/tp activations), computes
  the transform (M·K·(a+b) multiply-adds, repeated on every rank) and its columns, and returns ``[M, N]`` with zeros
  elsewhere, which vLLM's usual all-reduce (M·N) sums into the output.
"""

import dataclasses

import torch
import torch.nn.functional as F
from vllm.distributed import get_tp_group, tensor_model_parallel_all_gather
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)

from quant_core import CheckpointTensorError, DescriptionError, TensorSpec, UnsupportedSchemeError
from vllm_adapter.params import checkpoint_dtype, is_whole_per_shard, make_parameter


@register_weight_loader_v2_supported_method
class ModelSlimLinearMethod(LinearMethodBase):
    """One quantized linear layer (column, merged, QKV or row parallel) served by ``quant_core``.

    ``shards``: the checkpoint prefixes of the layer's shards, in vLLM's order (``...q_proj``, ``...k_proj``,
    ``...v_proj`` for a fused ``qkv_proj``); ``shard_prefixes`` are those the checkpoint has (Gemma 4 may lack v_proj).
    Every stored tensor is checked against the scheme's specs before vLLM loads it (a description naming the wrong
    quant type stops with quant-core's error naming the tensor), then registered as a vLLM parameter.
    """

    def __init__(self, config, quant_type: str, prefix: str, shards: list[str]) -> None:
        self.config = config
        self.quant_type = quant_type
        self.prefix = prefix
        self.shards = shards
        self.shard_prefixes = [s for s in shards if f"{s}.weight" in config.description.entries]

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
        **extra_weight_attrs,
    ):  # fmt: skip
        row = isinstance(layer, RowParallelLinear)
        tp_size = getattr(layer, "tp_size", 1) if row else 1
        scheme = self.config.scheme(self.quant_type, "linear", self.shard_prefixes[0], row_parallel=row)
        # a row-parallel layer: the full layer's specs, then this rank's slice of each
        specs = scheme.weight_specs(input_size if row else input_size_per_partition, sum(output_partition_sizes),
                                    params_dtype)  # fmt: skip
        self._check_stored_tensors(scheme, layer, input_size, output_partition_sizes, params_dtype)
        whole_rows = tp_size > 1 and "left_trans" in specs  # FlatQuant: gather the row, split N instead of K
        if tp_size > 1:
            shard = self._output_shard if whole_rows else self._row_shard
            specs = {name: shard(spec, tp_size) for name, spec in specs.items()}
        entries, dtypes = self.config.description.entries, self.config.tensors
        weight_loader = extra_weight_attrs["weight_loader"]
        names = []
        for name, spec in specs.items():
            keys = [f"{shard}.{name}" for shard in self.shard_prefixes]
            if spec.optional and not any(k in entries for k in keys):
                continue  # e.g. v1 static W8A8 has no weight_scale: do not register what will not be loaded
            stored = dtypes[keys[0]].dtype if keys[0] in dtypes else None
            dtype = checkpoint_dtype(spec, stored, keys[0])
            param = make_parameter(spec, dtype, weight_loader, len(output_partition_sizes), whole_rows=whole_rows)
            layer.register_parameter(name, param)
            names.append(name)
        layer.modelslim_scheme = scheme
        layer.modelslim_params = names
        layer.modelslim_specs = specs
        num_shards = len(output_partition_sizes)
        layer.modelslim_per_shard = [
            n for n in names if specs[n].per_shard_scalar or is_whole_per_shard(specs[n], num_shards)
        ]
        layer.modelslim_zero_on_other_ranks = row and getattr(layer, "tp_rank", 0) > 0
        layer.modelslim_whole_rows = whole_rows
        layer.modelslim_split_rows = tp_size > 1 and not whole_rows  # per-token amax: max over the ranks

    def _check_stored_tensors(self, scheme, layer, k: int, partition_sizes: list[int], params_dtype) -> None:
        """quant-core's ``TensorSpec.check`` on each shard's stored shapes and dtypes (from the safetensors headers)."""
        if len(self.shards) != len(partition_sizes):
            raise DescriptionError(
                f"layer {self.prefix!r}: the packed-module table maps it to {len(self.shards)} checkpoint shard(s) "
                f"({', '.join(self.shards)}), but vLLM builds it from {len(partition_sizes)}. Fix the table for "
                f"model_type {self.config.model_type!r} in model_mappings (it must list the shards in vLLM's order)."
            )
        for shard, n in zip(self.shards, self.full_sizes(layer, partition_sizes), strict=True):
            stored = self.config.owned_tensors(shard)
            for name, spec in scheme.weight_specs(k, n, params_dtype).items():
                if name in stored:
                    spec.check(torch.empty(stored[name].shape, dtype=stored[name].dtype, device="meta"), shard)

    @staticmethod
    def full_sizes(layer, partition_sizes: list[int]) -> list[int]:
        """Each shard's output size in the checkpoint (before tensor-parallel sharding)."""
        if not isinstance(layer, ColumnParallelLinear):
            return [layer.output_size]
        replicas = [1] * len(partition_sizes)
        if isinstance(layer, QKVParallelLinear):  # k/v heads repeat on ranks when there are fewer than ranks
            replicas[1:] = [layer.num_kv_head_replicas] * (len(partition_sizes) - 1)
        return [size * layer.tp_size // r for size, r in zip(partition_sizes, replicas, strict=True)]

    @staticmethod
    def _row_shard(spec: TensorSpec, tp_size: int) -> TensorSpec:
        if spec.input_dim is None:
            return spec  # replicated
        if spec.shape[spec.input_dim] == 1:  # one group spanning K (e.g. W4A16 with group_size 0): replicated
            return dataclasses.replace(spec, input_dim=None)
        return dataclasses.replace(spec, shape=spec.shard_shape("row", tp_size))

    def _output_shard(self, spec: TensorSpec, tp_size: int) -> TensorSpec:
        """A whole-rows row-parallel layer's tensor: this rank's N/tp output columns, all of K."""
        try:
            return dataclasses.replace(spec, shape=spec.shard_shape("column", tp_size))
        except CheckpointTensorError as e:
            raise UnsupportedSchemeError(
                f"row-parallel layer {self.prefix!r} is {self.quant_type}: its FlatQuant transform mixes the whole "
                f"input row, so each of the {tp_size} ranks computes a share of the output features instead, but "
                f"they do not split evenly ({e}). Serve with a tensor-parallel size that divides them."
            ) from None

    def checkpoint_tensors(self, layer) -> dict[str, torch.Tensor]:
        """The loaded tensors, handed over to the scheme (vLLM's parameters are dropped from the layer)."""
        tensors = {name: layer._parameters.pop(name).data for name in layer.modelslim_params}
        specs = layer.modelslim_specs
        for name in layer.modelslim_per_shard:  # one activation quantizer / transform for the fused matmul
            slots = tensors[name]
            if not specs[name].validated_only and not torch.equal(slots, slots[:1].expand_as(slots)):
                shown = f" {slots.flatten().tolist()}" if slots.numel() <= 8 else ""
                raise CheckpointTensorError(
                    f"{self.prefix}.{name}: the fused shards {', '.join(self.shard_prefixes)} carry different "
                    f"values{shown}; their shared input goes through one fused matmul, which needs one. Re-quantize "
                    "with one activation range / transform for these shards."
                )
            tensors[name] = (slots[0] if slots.dim() > 1 else slots[:1]).clone()
        if layer.modelslim_zero_on_other_ranks and "quant_bias" in tensors:
            tensors["quant_bias"] = torch.zeros_like(tensors["quant_bias"])  # rank 0 adds the whole row's sum
        return tensors

    def process_weights_after_loading(self, layer) -> None:
        tensors = self.checkpoint_tensors(layer)
        layer.modelslim_runtime = layer.modelslim_scheme.process_weights(tensors, layer=self.prefix)
        if getattr(layer, "modelslim_split_rows", False):
            layer.modelslim_runtime.amax_reduce = max_over_tp_ranks

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(layer, "modelslim_whole_rows", False):
            return self._apply_whole_rows(layer, x, bias)
        return layer.modelslim_scheme.apply(layer.modelslim_runtime, x, bias)

    @staticmethod
    def _apply_whole_rows(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's output columns from the all-gathered input rows, zeros elsewhere (vLLM's all-reduce sums the
        ranks' outputs), plus the bias vLLM passes on rank 0."""
        rows = tensor_model_parallel_all_gather(x.contiguous(), dim=-1)
        y = layer.modelslim_scheme.apply(layer.modelslim_runtime, rows)
        start = layer.tp_rank * y.shape[-1]
        y = F.pad(y, (start, layer.output_size - start - y.shape[-1]))
        return y if bias is None else y + bias


def max_over_tp_ranks(amax: torch.Tensor) -> torch.Tensor:
    """quant-core's ``Runtime.amax_reduce`` for a row-parallel layer: the per-token amax over the tensor-parallel
    group's parts of each row (an all-reduce MAX of M floats, in place)."""
    torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=get_tp_group().device_group)
    return amax


@register_weight_loader_v2_supported_method
class ModelSlimEmbeddingMethod(ModelSlimLinearMethod):
    """A quantized ``lm_head`` (``ParallelLMHead``): the linear scheme over this rank's vocabulary rows, as upstream's
    ``AscendEmbeddingMethod``. vLLM pads the vocabulary (to a multiple of 64 per rank) with zero rows; they are not
    quantized rows (zero scales), so the scheme runs on the real rows and the padded logits are zeros."""

    @staticmethod
    def full_sizes(layer, partition_sizes: list[int]) -> list[int]:
        return [layer.org_vocab_size]

    def process_weights_after_loading(self, layer) -> None:
        tensors = self.real_rows(layer)
        layer.modelslim_runtime = layer.modelslim_scheme.process_weights(tensors, layer=self.prefix)

    def real_rows(self, layer) -> dict[str, torch.Tensor]:
        """The loaded tensors without vLLM's zero padding rows (they are no quantized rows: zero scales); sets
        ``layer.modelslim_padding``."""
        tensors = self.checkpoint_tensors(layer)
        rows, padded = layer.num_org_embeddings_per_partition, layer.num_embeddings_per_partition
        if rows < padded:
            for name, spec in layer.modelslim_specs.items():
                if name in tensors and spec.output_dim is not None:
                    tensors[name] = tensors[name].narrow(spec.output_dim, 0, rows // spec.packed_factor)
        layer.modelslim_padding = padded - rows
        return tensors

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().apply(layer, x, bias)
        return F.pad(logits, (0, layer.modelslim_padding)) if layer.modelslim_padding else logits
