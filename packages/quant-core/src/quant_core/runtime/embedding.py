"""``QuantEmbedding``: an ``nn.Embedding`` stand-in whose forward is quant-core's quantized lookup."""

import torch
from torch import nn

from quant_core.embedding import EmbeddingTable, embedding_lookup


class QuantEmbedding(nn.Module):
    """``forward(ids) = embedding_lookup(table, ids)`` in ``dtype`` (the model's float dtype).

    ``table`` is what :func:`~quant_core.embedding.prepare_embedding` returned; like ``QuantLinear``'s runtime it is a
    plain attribute, so ``model.to(device)`` does not move it. There is no ``weight``: code that reads
    ``embed_tokens.weight`` (resizing the vocabulary, tying a head to it) does not apply to a quantized table.
    """

    def __init__(self, table: EmbeddingTable, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding_lookup(self.table, ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.table.quant_type}, {self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"
