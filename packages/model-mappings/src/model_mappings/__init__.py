"""Per-``model_type`` tables that connect vLLM module names to ModelSlim checkpoint names.

>>> packed_modules("qwen3_moe")["qkv_proj"]
('q_proj', 'k_proj', 'v_proj')
>>> remap_prefix("deepseek_v4", "layers.3.attn.wq_a")
'model.layers.3.self_attn.wq_a'
"""

import re

from model_mappings._tables import OPTIONAL_SHARDS, PACKED_MODULES, PREFIX_REMAPS, SUBSTRING_REMAPS

__all__ = [
    "known_model_types",
    "optional_shards",
    "packed_modules",
    "remap_prefix",
]

_MINIMAX_EXPERT_INDEX = re.compile(r"(\.experts)\.\d+(\..*)?$")
_COMPONENT_RENAMES: dict[str, dict[str, str]] = {
    "minimax": {"mlp": "block_sparse_moe"},
    "minimax_m2": {"mlp": "block_sparse_moe"},
    "bailing_hybrid": {"linear_attn": "attention", "self_attn": "attention"},
}


def known_model_types() -> list[str]:
    """Every ``model_type`` with its own packed-module table, sorted."""
    return sorted(PACKED_MODULES)


def packed_modules(model_type: str) -> dict[str, tuple[str, ...]] | None:
    """The fused-module table of ``model_type`` (a fresh copy), or ``None`` when it has none of its own.

    ``None`` means: use the mapping the vLLM model class supplies (``packed_modules_mapping``). An empty
    dict means the model fuses nothing that the checkpoint stores split.
    """
    table = PACKED_MODULES.get(model_type)
    return None if table is None else dict(table)


def optional_shards(model_type: str) -> dict[str, tuple[str, ...]]:
    """Shards a fused module of ``model_type`` may legitimately lack (e.g. Gemma 4 ``k_eq_v``: ``v_proj``)."""
    return dict(OPTIONAL_SHARDS.get(model_type, {}))


def remap_prefix(model_type: str, prefix: str) -> str:
    """Turn a vLLM module prefix into the name ``quant_model_description.json`` uses for ``model_type``.

    Applies, in order: the leading-prefix table, the substring table, then the per-model renames upstream
    hard-codes (MiniMax ``mlp`` -> ``block_sparse_moe`` with ``experts.<i>`` truncated to ``experts``;
    Bailing-hybrid attention names). Unknown model types come back unchanged.
    """
    for old, new in PREFIX_REMAPS.get(model_type, {}).items():
        if prefix.startswith(old):
            prefix = new + prefix[len(old) :]
            break
    for old, new in SUBSTRING_REMAPS.get(model_type, {}).items():
        prefix = prefix.replace(old, new)
    renames = _COMPONENT_RENAMES.get(model_type)
    if renames:
        prefix = ".".join(renames.get(part, part) for part in prefix.split("."))
    if model_type in ("minimax", "minimax_m2"):
        prefix = _MINIMAX_EXPERT_INDEX.sub(r"\1", prefix)
    return prefix
