"""The linear method: registers a scheme's checkpoint tensors as vLLM parameters, then runs the scheme."""

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)

from quant_core import CheckpointTensorError, get_scheme
from quant_core.registry import accepted_options
from vllm_adapter.params import checkpoint_dtype, make_parameter


@register_weight_loader_v2_supported_method
class ModelSlimLinearMethod(LinearMethodBase):
    """One quantized linear layer (column, merged, QKV or row parallel) served by ``quant_core``.

    ``shard_prefixes``: the checkpoint prefixes of the layer's shards (``...q_proj``, ``...k_proj``, ``...v_proj``
    for a fused ``qkv_proj``), used to tell which optional tensors the checkpoint has and how it stores them.
    """

    def __init__(self, config, quant_type: str, prefix: str, shard_prefixes: list[str]) -> None:
        self.config = config
        self.quant_type = quant_type
        self.prefix = prefix
        self.shard_prefixes = shard_prefixes

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
        **extra_weight_attrs,
    ):  # fmt: skip
        desc = self.config.description
        options = {"version": desc.version, "group_size": desc.group_size}
        if "row_parallel" in accepted_options(self.quant_type, "linear"):
            options["row_parallel"] = isinstance(layer, RowParallelLinear)
        scheme = get_scheme(self.quant_type, "linear", **options)
        specs = scheme.weight_specs(input_size_per_partition, sum(output_partition_sizes), params_dtype)
        weight_loader = extra_weight_attrs["weight_loader"]
        names = []
        for name, spec in specs.items():
            keys = [f"{shard}.{name}" for shard in self.shard_prefixes]
            if spec.optional and not any(k in desc.entries for k in keys):
                continue  # e.g. v1 static W8A8 has no weight_scale: do not register what will not be loaded
            dtype = checkpoint_dtype(spec, self.config.tensor_dtypes.get(keys[0]), keys[0])
            layer.register_parameter(name, make_parameter(spec, dtype, weight_loader, len(output_partition_sizes)))
            names.append(name)
        layer.modelslim_scheme = scheme
        layer.modelslim_params = names
        layer.modelslim_per_shard = [n for n in names if specs[n].per_shard_scalar]

    def process_weights_after_loading(self, layer) -> None:
        tensors = {name: layer._parameters.pop(name).data for name in layer.modelslim_params}
        for name in layer.modelslim_per_shard:  # one activation quantizer for the fused matmul
            slots = tensors[name]
            if not torch.equal(slots, slots[:1].expand_as(slots)):
                raise CheckpointTensorError(
                    f"{self.prefix}.{name}: the fused shards {', '.join(self.shard_prefixes)} carry different values "
                    f"{slots.tolist()}; one fused matmul needs one. Re-quantize with a shared activation range."
                )
            tensors[name] = slots[:1].clone()
        layer.modelslim_runtime = layer.modelslim_scheme.process_weights(tensors, layer=self.prefix)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.modelslim_scheme.apply(layer.modelslim_runtime, x, bias)
