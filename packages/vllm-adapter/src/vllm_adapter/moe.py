"""The MoE method: stacked expert tensors as vLLM ``RoutedExperts`` parameters, then the quant-core MoE scheme."""

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

from quant_core import UnsupportedSchemeError
from vllm_adapter.params import checkpoint_dtype

# Suffixes vLLM's expert loader routes through its scale path; GROUP slices w2 along its input dim under TP.
SCALE_MARKERS = ("scale", "offset", "zero")


class ModelSlimMoEMethod(FusedMoEMethodBase):
    """The routed experts of one MoE layer served by ``quant_core``'s MoE scheme of ``quant_type``."""

    def __init__(self, moe, config, quant_type: str, prefix: str) -> None:
        super().__init__(moe)
        self.config = config
        self.quant_type = quant_type
        self.prefix = prefix

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):  # fmt: skip
        desc = self.config.description
        if self.moe.moe_parallel_config.use_ep:
            raise UnsupportedSchemeError(
                f"MoE layer {self.prefix!r}: expert parallelism is not supported by the ModelSlim MoE method yet. "
                "Serve without --enable-expert-parallel (tensor parallelism then splits every expert instead)."
            )
        extra_weight_attrs.pop("unpadded_hidden_size", None)
        extra_weight_attrs.pop("global_num_experts", None)
        scheme = self.config.scheme(self.quant_type, "moe", f"{self.prefix}.0.gate_proj")
        specs = scheme.weight_specs(num_experts, hidden_size, intermediate_size_per_partition, params_dtype)
        names = []
        for name, spec in specs.items():
            proj, suffix = name.split("_", 1)
            key = f"{self.prefix}.0.{'gate_proj' if proj == 'w13' else 'down_proj'}.{suffix}"
            if spec.optional and key not in desc.entries:
                continue
            stored = self.config.tensors[key].dtype if key in self.config.tensors else None
            dtype = checkpoint_dtype(spec, stored, key)
            param = torch.nn.Parameter(torch.empty(spec.shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, extra_weight_attrs)
            if any(marker in suffix for marker in SCALE_MARKERS):
                grouped = spec.input_dim is not None
                method = FusedMoeWeightScaleSupported.GROUP if grouped else FusedMoeWeightScaleSupported.CHANNEL
                set_weight_attrs(param, {"quant_method": method.value})
            names.append(name)
        layer.modelslim_scheme = scheme
        layer.modelslim_params = names

    def process_weights_after_loading(self, layer) -> None:
        tensors = {name: layer._parameters.pop(name).data for name in layer.modelslim_params}
        layer.modelslim_runtime = layer.modelslim_scheme.process_weights(tensors, layer=self.prefix)

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        # Shared experts are not ours to run: with no fused kernel that could overlap them (moe_kernel is None),
        # vLLM's MoE runner computes them itself and adds them to what this returns.
        activation = str(getattr(layer, "activation", "silu")).lower()
        if "silu" not in activation:
            raise UnsupportedSchemeError(
                f"MoE layer {self.prefix!r}: activation {activation!r}; the ModelSlim MoE schemes compute SwiGLU."
            )
        return layer.modelslim_scheme.apply(layer.modelslim_runtime, x, topk_weights, topk_ids.long(), "silu")
