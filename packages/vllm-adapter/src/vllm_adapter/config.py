"""``AscendModelSlimConfig``: vLLM's quantization config for ModelSlim checkpoints.

vLLM builds it from ``quantization="ascend"`` (or a ``quantization_config`` with ``quant_method: ascend``) and calls
``maybe_update_config(model_dir)``, where it reads ``quant_model_description.json`` and the safetensors headers.
``get_quant_method(layer, prefix)`` then resolves each layer with ``quant_core``'s lookup (upstream vllm-ascend's
rules) and returns our linear / MoE methods, or vLLM's unquantized ones for ``FLOAT`` layers.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts, UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

import model_mappings
from quant_core import QuantDescription
from quant_core.checkpoint import tensor_dtypes
from vllm_adapter.linear import ModelSlimLinearMethod
from vllm_adapter.moe import ModelSlimMoEMethod

logger = logging.getLogger(__name__)


class AscendModelSlimConfig(QuantizationConfig):
    """Quantization config for checkpoints described by ``quant_model_description.json``."""

    def __init__(self, description: QuantDescription | None = None) -> None:
        super().__init__()
        self.description = description
        self.tensor_dtypes: dict[str, torch.dtype] = {}
        self.model_type = ""
        self._warned_c8 = False

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
        if self.description is None:
            self.description = QuantDescription.from_checkpoint(Path(model_name))
            self.tensor_dtypes = tensor_dtypes(model_name)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.description is not None:  # e.g. the `language_model.` prefix of multimodal models
            mapped = hf_to_vllm_mapper.apply_dict(dict(self.description.entries))
            self.description = dataclasses.replace(self.description, entries=mapped)
            self.tensor_dtypes = hf_to_vllm_mapper.apply_dict(self.tensor_dtypes)

    # --- per layer -----------------------------------------------------------------------------------------
    def packed_modules(self) -> dict:
        table = model_mappings.packed_modules(self.model_type)
        return table if table is not None else dict(self.packed_modules_mapping)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if self.description is None:
            raise RuntimeError("AscendModelSlimConfig used before maybe_update_config read the description")
        key = model_mappings.remap_prefix(self.model_type, prefix)
        packed = self.packed_modules()
        optional = model_mappings.optional_shards(self.model_type)
        if isinstance(layer, LinearBase):
            quant_type = self.description.quant_type_for(key, "linear", packed, optional_shards=optional)
            if quant_type is None:
                return UnquantizedLinearMethod()
            parent, _, proj = key.rpartition(".")
            shards = [f"{parent}.{s}" if parent else s for s in packed.get(proj, [proj])]
            present = [s for s in shards if f"{s}.weight" in self.description.entries]
            return ModelSlimLinearMethod(self, quant_type, key, present)
        if isinstance(layer, RoutedExperts):
            quant_type = self.description.quant_type_for(key, "moe", packed)
            if quant_type is None:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return ModelSlimMoEMethod(layer.moe_config, self, quant_type, key)
        if self.description.enable_c8_quant and not self._warned_c8:
            self._warned_c8 = True
            logger.warning(
                "This checkpoint carries C8 (int8) KV-cache scales; they are read but the KV cache stays in the "
                "model dtype until KV-cache quantization lands."
            )
        return None


class ModelSlimAliasConfig(AscendModelSlimConfig):
    """The same config under the name ``"modelslim"`` (for when another package owns ``"ascend"``)."""

    def get_name(self) -> str:
        return "modelslim"
