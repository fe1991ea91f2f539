"""A quantized ``embed_tokens`` (``VocabParallelEmbedding``) and an ``lm_head`` tied to it.

The table's tensors load like a quantized lm_head's (``ModelSlimEmbeddingMethod``: the scheme's specs as vLLM
parameters, vocabulary rows split across tensor-parallel ranks, int4 byte rows split by half as many): each rank holds
its vocabulary rows, padded with zero rows up to ``num_embeddings_per_partition``. After loading, the padding is cut
off and quant-core's :func:`~quant_core.embedding.prepare_embedding` keeps the int rows and per-row scales;
``embedding(layer, ids)`` looks rows up with :func:`~quant_core.embedding.embedding_lookup`. vLLM has already mapped
the ids to this rank's rows (ids other ranks own become 0, and their output rows are zeroed before the all-reduce), so
every id is a real row here.

A tied head (``tie_word_embeddings`` with no ``lm_head`` tensors) has no tensors of its own: vLLM's ``tie_weights``
hands it the embedding, whose method then also prepares the linear scheme on the same tensors, and the head's
logits are that linear's (padded to the vocabulary partition like a quantized lm_head's).
"""

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

from quant_core import UnsupportedSchemeError, embedding_lookup, prepare_embedding
from vllm_adapter.linear import ModelSlimEmbeddingMethod


class ModelSlimVocabEmbeddingMethod(ModelSlimEmbeddingMethod):
    """A quantized ``VocabParallelEmbedding``; ``apply`` (the linear) serves a head tied to it."""

    serves_head = False  # set by ModelSlimTiedHeadMethod.tie_weights

    def process_weights_after_loading(self, layer) -> None:
        tensors = self.real_rows(layer)
        group_size = self.config.description.group_size
        layer.modelslim_table = prepare_embedding(self.quant_type, tensors, group_size=group_size, layer=self.prefix)
        if self.serves_head:
            layer.modelslim_runtime = layer.modelslim_scheme.process_weights(tensors, layer=self.prefix)

    def embedding(self, layer, ids: torch.Tensor) -> torch.Tensor:
        return embedding_lookup(layer.modelslim_table, ids, layer.params_dtype)


class ModelSlimTiedHeadMethod(QuantizeMethodBase):
    """An ``lm_head`` tied to a quantized ``embed_tokens`` (``embed``: its checkpoint prefix, for errors)."""

    def __init__(self, embed: str) -> None:
        self.embed_prefix = embed
        self.embed = None

    def create_weights(self, layer, *args, **kwargs) -> None:
        pass  # the embedding's tensors are the head's

    def tie_weights(self, layer, embed_tokens):
        method = getattr(embed_tokens, "quant_method", None)
        if not isinstance(method, ModelSlimVocabEmbeddingMethod):
            raise UnsupportedSchemeError(
                f"lm_head is tied to the quantized embedding {self.embed_prefix!r}, but vLLM ties it to a layer with "
                f"{type(method).__name__}. The description's embedding entries do not match the model's embed_tokens: "
                "fix the description, or keep the embedding FLOAT."
            )
        method.serves_head = True
        self.embed = embed_tokens  # a plain attribute of the method: no second registration of the module
        return layer

    def process_weights_after_loading(self, layer) -> None:
        if self.embed is None:
            raise UnsupportedSchemeError(
                f"lm_head was resolved as tied to the quantized embedding {self.embed_prefix!r}, but the model never "
                "tied it (vLLM's model class did not call tie_weights). Serve an untied checkpoint, or keep the "
                "embedding FLOAT."
            )

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed.quant_method.apply(self.embed, x, bias)
