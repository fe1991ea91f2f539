"""Which quant type a layer has: upstream vllm-ascend's rules (``modelslim-format.md`` §3), with errors a
user can act on where upstream raises a bare ``KeyError``.

* Only ``<prefix>.weight`` entries decide; ``model_quant_type`` is never consulted.
* A fused layer (its last prefix component is a key of ``packed_modules``) is resolved through its shards,
  which must all carry one type. MoE ``experts`` resolve through expert 0's projections.
* ``"FLOAT"`` means unquantized: the lookup returns ``None``.
"""

import difflib
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from quant_core.errors import LayerLookupError, MixedShardsError
from quant_core.quant_types import FLOAT, LAYER_KINDS

if TYPE_CHECKING:
    from quant_core.description import QuantDescription

# Used for a MoE layer when the packed-module table has no "experts" entry (upstream would KeyError).
DEFAULT_EXPERT_SHARDS = ("experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj")


def quant_type_for(
    desc: "QuantDescription",
    prefix: str,
    layer_kind: str,
    packed_modules: Mapping[str, Collection[str]] | None = None,
    *,
    optional_shards: Mapping[str, Collection[str]] | None = None,
) -> str | None:
    """The quant type of the layer at vLLM prefix ``prefix`` (``None`` = unquantized).

    ``layer_kind`` is ``"linear"`` (also for quantized embeddings / ``lm_head``), ``"moe"`` or
    ``"attention"``. ``packed_modules`` maps fused names to shard names (``model_mappings.packed_modules``
    or the vLLM model's ``packed_modules_mapping``). ``optional_shards`` names shards a fused module may lack
    (Gemma 4 ``k_eq_v``: ``{"qkv_proj": ["v_proj"]}``).
    """
    if layer_kind not in LAYER_KINDS:
        raise ValueError(f"layer_kind must be one of {', '.join(LAYER_KINDS)}, got {layer_kind!r}")
    if layer_kind == "attention":
        return _attention_type(desc, prefix)
    mapping = packed_modules or {}
    parent, _, proj = prefix.rpartition(".")
    parent = parent + "." if parent else ""
    shards = mapping.get(proj)
    if shards is None and layer_kind == "moe" and proj == "experts":
        shards = DEFAULT_EXPERT_SHARDS
    if shards:
        qtype = _fused_type(desc, prefix, layer_kind, parent, proj, list(shards), optional_shards or {})
    else:
        qtype = _plain_type(desc, prefix, layer_kind, mapping)
    return None if qtype == FLOAT else qtype


def _fused_type(desc, prefix, layer_kind, parent, proj, shards, optional_shards) -> str:
    keys = {shard: f"{parent}{shard}.weight" for shard in shards}
    found = {shard: desc.entries[key] for shard, key in keys.items() if key in desc.entries}
    tolerated = set(optional_shards.get(proj, ()))
    missing = [shard for shard in shards if shard not in found and shard not in tolerated]
    if missing or not found:
        fix = None
        if found:
            fix = (
                f"the description has {', '.join(found)} but not {', '.join(missing)} for fused module {proj!r}. "
                "If this model legitimately lacks that shard, pass it in optional_shards; otherwise the "
                "packed-module table names the wrong shards, or the description belongs to another checkpoint."
            )
        raise _missing_entry_error(desc, prefix, layer_kind, [keys[s] for s in (missing or shards)], proj, fix=fix)
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{shard}={qtype}" for shard, qtype in found.items())
        if FLOAT in found.values():
            problem = "some but not all of its shards are quantized"
        else:
            problem = "its shards do not share one quant type"
        raise MixedShardsError(
            f"Fused {layer_kind} layer {prefix!r}: {problem} ({listing}) in {desc.source}. vLLM runs "
            f"{proj} as one matmul, so every shard needs the same scheme. Re-quantize with one scheme for "
            f"{', '.join(shards)} (quant-core's quantizer always does), or keep all of them FLOAT."
        )
    return next(iter(found.values()))


def _plain_type(desc, prefix, layer_kind, mapping) -> str:
    key = f"{prefix}.weight"
    if key in desc.entries:
        return desc.entries[key]
    if prefix == "lm_head" and "language_model.lm_head.weight" in desc.entries:
        return desc.entries["language_model.lm_head.weight"]
    # Upstream's skip test: a layer is unquantized when any of its `.weight` entries is FLOAT (this covers
    # wrapper modules whose weight lives one level down). We anchor on `prefix + "."`, where upstream's bare
    # `startswith(prefix)` would also let `mlp.gate` match `mlp.gate_proj`.
    if any(k.startswith(prefix + ".") and k.endswith(".weight") and v == FLOAT for k, v in desc.entries.items()):
        return FLOAT
    raise _missing_entry_error(desc, prefix, layer_kind, [key], prefix.rpartition(".")[2], mapping=mapping)


def _attention_type(desc, prefix: str) -> str | None:
    from quant_core.description import layer_id

    lid = layer_id(prefix)
    if lid is None:
        return None
    if lid in desc.fa_quant_layer_ids or lid in desc.indexer_quant_layer_ids:
        override = desc.entries.get(f"{prefix}.indexer.quant_type")
        return override or desc.fa_quant_type or desc.indexer_quant_type
    if desc.enable_c8_quant and lid in desc.c8_layer_ids:
        return "C8"
    return None


def _missing_entry_error(desc, prefix, layer_kind, wanted, proj, *, mapping=None, fix=None) -> LayerLookupError:
    weight_keys = [k for k in desc.entries if k.endswith(".weight")]
    closest: list[str] = []
    for key in wanted:
        for match in difflib.get_close_matches(key, weight_keys, n=3, cutoff=0.6):
            if match not in closest:
                closest.append(match)
    lines = [
        f"No entry for {layer_kind} layer {prefix!r} in {desc.source}.",
        f"Looked for: {', '.join(wanted)}",
        f"Closest keys that exist: {', '.join(closest[:5]) if closest else '(none)'}",
        "Likely fix: " + (fix or _likely_fix(prefix, wanted, proj, weight_keys, mapping)),
    ]
    return LayerLookupError("\n".join(lines))


def _likely_fix(prefix, wanted, proj, weight_keys, mapping) -> str:
    for key in wanted:
        for existing in weight_keys:
            if existing.endswith("." + key) or key.endswith("." + existing):
                return (
                    f"the description names this layer {existing!r}: the prefixes differ. Rename keys with the "
                    "model's prefix mapper (QuantDescription.with_renamed_keys / vLLM's hf_to_vllm_mapper) or "
                    "model_mappings.remap_prefix for this model_type."
                )
    parent = prefix.rpartition(".")[0] + "."
    siblings = sorted({k[len(parent) :].split(".")[0] for k in weight_keys if k.startswith(parent)})
    if mapping is not None and siblings and proj not in siblings:
        shards = _guess_shards(proj, siblings)
        example = f"{{{proj!r}: {shards}}}" if shards else f"{{{proj!r}: [<shard names>]}}"
        return (
            f"{proj!r} looks like a fused module with no packed-module table entry, while the description "
            f"lists {parent}{{{', '.join(shards or siblings)}}}. Pass the table for this model_type "
            f"(model_mappings.packed_modules, or the vLLM model's packed_modules_mapping), e.g. {example}."
        )
    return (
        "the description does not cover this layer. Check that it belongs to this checkpoint (layer names and "
        "count match config.json); a layer the producer left out (ModelSlim omits MTP layers) can be added "
        'with the value "FLOAT"; when serving with vLLM, pass `--quantization ascend` so the adapter applies '
        "the model's prefix mappings."
    )


def _guess_shards(fused: str, siblings: list[str]) -> list[str]:
    """``qkv_proj`` -> the siblings ``q_proj``, ``k_proj``, ``v_proj`` (same suffix, stem inside the fused stem)."""
    stem, _, suffix = fused.rpartition("_")
    guess = [s for s in siblings if s.endswith("_" + suffix) and s[: -len(suffix) - 1] in stem]
    return sorted(guess, key=lambda s: stem.find(s[: -len(suffix) - 1])) if len(guess) >= 2 else []
