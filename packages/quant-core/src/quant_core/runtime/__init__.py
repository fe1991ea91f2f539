"""A plain-PyTorch runtime for ModelSlim checkpoints: a transformers model whose quantized layers run quant-core's
schemes, to check a checkpoint (logits, generations) before it is served by vLLM.

>>> from quant_core.runtime import load_quantized
>>> model = load_quantized("/path/to/Qwen3-8B-w8a8")  # doctest: +SKIP

Needs the ``hf`` extra (transformers, safetensors).
"""

from quant_core.runtime.embedding import QuantEmbedding
from quant_core.runtime.linear import QuantLinear
from quant_core.runtime.loader import IGNORED_SUFFIXES, load_quantized
from quant_core.runtime.moe import QuantExperts

__all__ = ["IGNORED_SUFFIXES", "QuantEmbedding", "QuantExperts", "QuantLinear", "load_quantized"]
