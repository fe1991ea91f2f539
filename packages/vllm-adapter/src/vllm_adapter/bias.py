"""Biases msModelSlim's anti-outlier pass (m4) adds to layers the float architecture builds without one
(modelslim-tool.md §4.10): ``.bias`` on q/k/v and gate/up projections, and on RMSNorms (even Qwen3's q/k norms).

vLLM would drop them silently: its linear layers register ``bias = None`` when the model has no bias, its norms
have no bias at all, and its weight loader ignores unexpected ``.bias`` tensors. Here they load through vLLM's own
loaders and are applied as quant-core's runtime applies them: a linear passes its bias to the scheme (whose
contract says whether it is added; static W8A8 folded it into ``quant_bias``), a norm computes
``rmsnorm(x) · weight + bias``.
"""

import torch
from torch import nn
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.model_executor.utils import set_weight_attrs

from quant_core import CheckpointTensorError


def give_linear_a_bias(layer: nn.Module) -> None:
    """Make ``layer`` (being built: called before its ``__init__`` registers the bias) get a bias parameter where
    vLLM would register ``None``, shaped, sharded and loaded exactly like the bias vLLM creates for ``bias=True``."""
    register = layer.register_parameter

    def register_parameter(name: str, param: nn.Parameter | None) -> None:
        if name == "bias":
            del layer.register_parameter  # back to nn.Module's method
            if param is None:
                param = _bias_parameter(layer)
        register(name, param)

    layer.register_parameter = register_parameter


def _bias_parameter(layer: nn.Module) -> nn.Parameter:
    size = layer.output_size_per_partition if isinstance(layer, ColumnParallelLinear) else layer.output_size
    # zeros: a fused layer whose shards do not all carry a bias adds nothing for the others
    bias = nn.Parameter(torch.zeros(size, dtype=layer.params_dtype), requires_grad=False)
    set_weight_attrs(bias, {"output_dim": 0, "weight_loader": layer.weight_loader})
    return bias


def enable_norm_biases() -> None:
    """Let vLLM's ``RMSNorm`` (and subclasses) take a ``.bias`` from the checkpoint.

    vLLM's weight loader hands a module its own tensors when the module has ``load_weights``; ours loads them as
    vLLM would and turns a ``bias`` into a parameter plus a forward hook. Installed on the class, once per process,
    and only when a ModelSlim description lists norm biases; norms without one load exactly as before.
    """
    from vllm.model_executor.layers.layernorm import RMSNorm

    if getattr(RMSNorm, "load_weights", None) is not _load_norm_weights:
        RMSNorm.load_weights = _load_norm_weights


def _load_norm_weights(norm: nn.Module, weights) -> set[str]:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    loaded = set()
    for name, tensor in weights:
        if name == "bias" and getattr(norm, "bias", None) is None:
            weight = norm.weight
            if tuple(tensor.shape) != tuple(weight.shape):
                raise CheckpointTensorError(
                    f"norm bias of shape {tuple(tensor.shape)} for a {type(norm).__name__} of size "
                    f"{tuple(weight.shape)}: the checkpoint does not belong to this model."
                )
            norm.register_parameter("bias", nn.Parameter(torch.empty_like(weight), requires_grad=False))
            norm.register_forward_hook(_add_norm_bias)
        param = norm._parameters.get(name)
        if param is None:
            raise CheckpointTensorError(
                f"checkpoint tensor {name!r} for a {type(norm).__name__}, which has only "
                f"{', '.join(norm._parameters) or 'no parameters'}: the checkpoint does not belong to this model."
            )
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)
    return loaded


def _add_norm_bias(norm: nn.Module, args, out):
    if isinstance(out, tuple):  # fused residual add: (normalized, residual)
        return (out[0] + norm.bias, *out[1:])
    return out + norm.bias
