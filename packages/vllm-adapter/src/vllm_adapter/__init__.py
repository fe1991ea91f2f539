"""vLLM glue for ModelSlim checkpoints: the quantization config and thin layer methods over ``quant_core``."""

from vllm_adapter.config import AscendModelSlimConfig, ModelSlimAliasConfig
from vllm_adapter.embedding import ModelSlimTiedHeadMethod, ModelSlimVocabEmbeddingMethod
from vllm_adapter.kv_cache import ModelSlimC8KVCacheMethod
from vllm_adapter.linear import ModelSlimEmbeddingMethod, ModelSlimLinearMethod
from vllm_adapter.moe import ModelSlimMoEMethod

__all__ = [
    "AscendModelSlimConfig",
    "ModelSlimAliasConfig",
    "ModelSlimC8KVCacheMethod",
    "ModelSlimEmbeddingMethod",
    "ModelSlimLinearMethod",
    "ModelSlimMoEMethod",
    "ModelSlimTiedHeadMethod",
    "ModelSlimVocabEmbeddingMethod",
]
