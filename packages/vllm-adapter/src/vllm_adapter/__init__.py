"""vLLM glue for ModelSlim checkpoints: the quantization config and thin layer methods over ``quant_core``."""

from vllm_adapter.config import AscendModelSlimConfig, ModelSlimAliasConfig
from vllm_adapter.linear import ModelSlimLinearMethod
from vllm_adapter.moe import ModelSlimMoEMethod

__all__ = ["AscendModelSlimConfig", "ModelSlimAliasConfig", "ModelSlimLinearMethod", "ModelSlimMoEMethod"]
