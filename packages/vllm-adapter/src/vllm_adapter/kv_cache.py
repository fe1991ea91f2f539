"""C8 KV-cache checkpoints: the int8 KV-cache scales load and stay on the attention layer; the cache itself stays in
the model dtype until KV-cache quantization lands (the config logs that once).

Checkpoint tensors (modelslim-format.md §6.1), float32 ``[num_kv_heads · head_dim]`` each, written on the projections
and renamed by the config's cache-scale mapper: ``<attn>.k_proj.kv_cache_scale`` -> ``<attn>.attn.k_cache_scale``,
likewise ``k_cache_offset``, ``v_cache_scale``, ``v_cache_offset``. Each tensor-parallel rank keeps the channels of
its own KV heads (``[local_kv_heads · head_dim]``).
"""

import functools

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
from vllm.model_executor.utils import set_weight_attrs

from quant_core import CheckpointTensorError

C8_TENSORS = ("k_cache_scale", "k_cache_offset", "v_cache_scale", "v_cache_offset")


class ModelSlimC8KVCacheMethod(BaseKVCacheMethod):
    """Registers the four C8 tensors on an ``Attention`` layer; the KV cache keeps vLLM's dtype."""

    def create_weights(self, layer: nn.Module) -> None:
        size = layer.num_kv_heads * layer.head_size
        for name in C8_TENSORS:
            param = nn.Parameter(torch.ones(size, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": functools.partial(_load_kv_heads, layer=layer, name=name)})
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for name in ("k_cache_scale", "v_cache_scale"):
            scale = getattr(layer, name)
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise CheckpointTensorError(
                    f"{layer.layer_name}.{name}: C8 scales must be finite and > 0; the checkpoint is corrupted. "
                    "Re-quantize with --kv-cache C8."
                )


def _load_kv_heads(param: nn.Parameter, loaded: torch.Tensor, *, layer: nn.Module, name: str) -> None:
    """Copy this rank's KV heads (a rank holds one head, replicated, when there are fewer heads than ranks)."""
    head, local = layer.head_size, layer.num_kv_heads
    rank, ranks = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    total, rest = divmod(loaded.numel(), head)
    if loaded.dim() != 1 or rest or not total or (total // ranks if total >= ranks else 1) != local:
        raise CheckpointTensorError(
            f"{layer.layer_name}.{name} has shape {tuple(loaded.shape)}, expected [{local * ranks * head}] "
            f"(num_kv_heads × head_dim {head}). The checkpoint does not belong to this model."
        )
    first = rank * local if total >= ranks else rank * total // ranks
    param.data.copy_(loaded.narrow(0, first * head, local * head))
