"""``AscendModelSlimConfig``: vLLM's quantization config for ModelSlim checkpoints.

vLLM builds it from ``quantization="ascend"`` (or a ``quantization_config`` with ``quant_method: ascend``) and calls
``maybe_update_config(model_dir)``, where it reads ``quant_model_description.json`` and the safetensors headers.
``get_quant_method(layer, prefix)`` then resolves each layer with ``quant_core``'s lookup (upstream vllm-ascend's
rules) and returns our linear / MoE / embedding / lm_head / KV-cache methods, or vLLM's unquantized ones for ``FLOAT``
layers. A quantized ``embed_tokens`` (not written by msModelSlim, but by ``quant-core quantize`` on request) gets the
quantized lookup, and a head tied to it runs the same tensors (``embedding.py``).
Tensors msModelSlim's anti-outlier pass adds to layers that have none (``.bias`` on projections and norms) are
loaded and applied (``bias.py``).

The environment variable ``MODELSLIM_BACKEND`` (``auto``, ``reference``, ``cpu``, ``npu``; default ``auto``) picks
quant-core's kernels, e.g. ``reference`` to debug a checkpoint against the plain-PyTorch formulas.
"""

import dataclasses
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.fused_moe import RoutedExperts, UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

import model_mappings
from quant_core import FLOAT, QuantDescription, UnsupportedSchemeError, get_scheme
from quant_core.embedding import check_embedding_scheme
from quant_core.registry import accepted_options
from quant_core.schemes.base import BACKENDS
from vllm_adapter.bias import enable_norm_biases, give_linear_a_bias
from vllm_adapter.checkpoint import TensorInfo, tensor_infos
from vllm_adapter.embedding import ModelSlimTiedHeadMethod, ModelSlimVocabEmbeddingMethod
from vllm_adapter.kv_cache import ModelSlimC8KVCacheMethod
from vllm_adapter.linear import ModelSlimEmbeddingMethod, ModelSlimLinearMethod
from vllm_adapter.moe import ModelSlimMoEMethod

logger = logging.getLogger(__name__)

BACKEND_ENV = "MODELSLIM_BACKEND"
# C8 scales sit on k_proj / v_proj in the checkpoint (modelslim-format.md §2.3); vLLM keeps them on the attention
# layer. A regex, because vLLM applies regexes before its stacked q/k/v -> qkv_proj renaming.
C8_SCALE_NAMES = re.compile(r"\.([kv])_proj\.kv_cache_(scale|offset)$")


class AscendModelSlimConfig(QuantizationConfig):
    """Quantization config for checkpoints described by ``quant_model_description.json``."""

    def __init__(self, description: QuantDescription | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.description = description
        self.tensors: dict[str, TensorInfo] = {}
        self.model_type = ""
        self.tie_word_embeddings = False
        self.backend = backend or os.environ.get(BACKEND_ENV, "auto")
        if self.backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={self.backend!r}: use one of {', '.join(BACKENDS)}.")
        self._warned_c8 = False
        self._owners: dict[str, dict[str, TensorInfo]] | None = None  # module -> {tensor suffix: info}

    # --- vLLM's config protocol ----------------------------------------------------------------------------
    def get_name(self) -> str:
        return "ascend"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # vLLM then builds the config with no arguments; maybe_update_config reads the description

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AscendModelSlimConfig":
        return cls()

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        self.model_type = getattr(hf_config, "model_type", "") or ""
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        if self.description is None:
            self.description = QuantDescription.from_checkpoint(Path(model_name))
            self.tensors = tensor_infos(model_name)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.description is not None:  # e.g. the `language_model.` prefix of multimodal models
            mapped = hf_to_vllm_mapper.apply_dict(dict(self.description.entries))
            self.description = dataclasses.replace(self.description, entries=mapped)
            self.tensors = hf_to_vllm_mapper.apply_dict(self.tensors)
            self._owners = None

    @staticmethod
    def get_cache_scale_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        c8 = WeightsMapper(orig_to_new_regex={C8_SCALE_NAMES: r".attn.\1_cache_\2"})
        return c8 | QuantizationConfig.get_cache_scale_mapper()

    # --- schemes -------------------------------------------------------------------------------------------
    def scheme(self, quant_type: str, kind: str, shard: str, **options: Any):
        """quant-core's scheme for a layer whose (first) checkpoint shard is ``shard``, with the description's
        globals, our backend, ``options`` the scheme accepts, and the options it reads off the checkpoint's tensor
        shapes (FlatQuant transform sizes, W4A8 ``scale_bias`` form)."""
        desc = self.description
        options = {"backend": self.backend, "version": desc.version, "group_size": desc.group_size, **options}
        try:
            accepted = accepted_options(quant_type, kind)
            options = {k: v for k, v in options.items() if k in accepted}
            scheme = get_scheme(quant_type, kind, **options)
        except UnsupportedSchemeError as e:
            raise UnsupportedSchemeError(
                f"{kind} layer {shard.removesuffix('.0.gate_proj')!r} is {quant_type} in {desc.source}.\n{e}\n"
                "Re-quantize this layer with a supported scheme, or mark it FLOAT in the description."
            ) from None
        read_options = getattr(scheme, "checkpoint_options", None)
        if read_options is None:
            return scheme
        infos = self.owned_tensors(shard)
        header = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
        found = read_options(header, shard)
        return get_scheme(quant_type, kind, **{**options, **found}) if found else scheme

    def owned_tensors(self, module: str) -> dict[str, TensorInfo]:
        """The checkpoint tensors ``<module>.<name>``, by ``name``."""
        if self._owners is None:
            self._owners = {}
            for name, info in self.tensors.items():
                owner, _, suffix = name.rpartition(".")
                self._owners.setdefault(owner, {})[suffix] = info
        return self._owners.get(module, {})

    @functools.cached_property
    def norm_biases(self) -> bool:
        """Whether msModelSlim's anti-outlier pass gave norms a ``.bias`` (modelslim-tool.md §4.10)."""
        return any(k.endswith(".bias") and "norm" in k and v == FLOAT for k, v in self.description.entries.items())

    # --- per layer -----------------------------------------------------------------------------------------
    def packed_modules(self) -> dict:
        table = model_mappings.packed_modules(self.model_type)
        return table if table is not None else dict(self.packed_modules_mapping)

    def shards(self, key: str) -> list[str]:
        """The checkpoint prefixes behind the (remapped) module ``key``: its q/k/v for a fused ``qkv_proj``."""
        packed = self.packed_modules()
        parent, _, proj = key.rpartition(".")
        return [f"{parent}.{s}" if parent else s for s in packed.get(proj, [proj])]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        desc = self.description
        if desc is None:
            raise RuntimeError("AscendModelSlimConfig used before maybe_update_config read the description")
        key = model_mappings.remap_prefix(self.model_type, prefix)
        packed = self.packed_modules()
        if self.norm_biases:
            enable_norm_biases()  # before the norms load: they are built without a bias
        if isinstance(layer, LinearBase):
            optional = model_mappings.optional_shards(self.model_type)
            quant_type = desc.quant_type_for(key, "linear", packed, optional_shards=optional)
            shards = self.shards(key)
            if any(f"{s}.bias" in desc.entries for s in shards):
                give_linear_a_bias(layer)  # registered only if the model builds this layer without one
            if quant_type is None:
                return UnquantizedLinearMethod()
            return ModelSlimLinearMethod(self, quant_type, key, shards)
        if isinstance(layer, RoutedExperts):
            quant_type = desc.quant_type_for(key, "moe", packed)
            if quant_type is None:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return ModelSlimMoEMethod(layer.moe_config, self, quant_type, key)
        if isinstance(layer, VocabParallelEmbedding):
            return self._embedding_method(layer, key)
        if isinstance(layer, AttentionLayerBase):
            return self._attention_method(key)
        return None

    def quantized_embedding(self) -> str:
        """The prefix of the description's quantized token embedding (``model.embed_tokens``), or ``""``."""
        owners = dict.fromkeys(k.rpartition(".")[0] for k, v in self.description.entries.items() if v != FLOAT)
        return next((o for o in owners if o.rpartition(".")[2].startswith("embed")), "")

    def _embedding_method(self, layer: VocabParallelEmbedding, key: str):
        is_head = isinstance(layer, ParallelLMHead)
        if is_head and self.tie_word_embeddings and f"{key}.weight" not in self.description.entries:
            embed = self.quantized_embedding()
            return ModelSlimTiedHeadMethod(embed) if embed else None  # else tied to a float embedding
        if not key and not is_head:  # vLLM builds some embeddings without a prefix (Llama's embed_tokens)
            key = self.quantized_embedding()
        quant_type = self.description.quant_type_for(key, "linear") if key else None
        if quant_type is None:
            return None  # vLLM's unquantized embedding method
        if is_head:
            return ModelSlimEmbeddingMethod(self, quant_type, key, [key])
        try:
            check_embedding_scheme(quant_type, key)
        except UnsupportedSchemeError as e:
            raise UnsupportedSchemeError(f"{e} (in {self.description.source})") from None
        return ModelSlimVocabEmbeddingMethod(self, quant_type, key, [key])

    def _attention_method(self, key: str):
        quant_type = self.description.quant_type_for(key, "attention")
        if quant_type is None:
            return None
        if quant_type != "C8":
            raise UnsupportedSchemeError(
                f"attention layer {key!r}: {quant_type} attention / KV-cache quantization (fa_quant_type, "
                f"indexer_quant_type in {self.description.source}) is not supported by vllm-adapter yet. Serve this "
                "checkpoint with vllm-ascend on Ascend NPUs, or re-quantize without attention quantization."
            )
        if not self._warned_c8:
            self._warned_c8 = True
            logger.warning(
                "%s has C8 (int8) KV-cache scales: they are loaded and kept on the attention layers, but the KV cache "
                "stays in the model dtype until KV-cache quantization lands in vllm-adapter.",
                self.description.source,
            )
        return ModelSlimC8KVCacheMethod(self)


class ModelSlimAliasConfig(AscendModelSlimConfig):
    """The same config under the name ``"modelslim"`` (for when another package owns ``"ascend"``)."""

    def get_name(self) -> str:
        return "modelslim"
